"""Step lines for ``kubectl logs``, ``logs/metrics.jsonl``, ``logs/train.log``, plots and optional wandb.

One plain line per step on stdout (no progress bars, no colour), e.g.::

    step 12/50 epoch 1/10 | loss 0.324 reward 1.56±0.30 adv 0.23 entropy 0.678 kl 0.010 lr 1.0e-06 | 3.1 s/step 420 tok/s | eta 2m30s

Metric keys (metrics.jsonl, one JSON object per step; README documents each):
``step``, ``epoch``, ``loss/policy``, ``loss/total``, ``loss/sft``, ``reward/mean``, ``reward/std``,
``reward/<name>``, ``adv/abs_mean``, ``entropy``, ``kl``, ``clip_frac``, ``grad_norm``, ``lr``,
``completion/len_mean``, ``completion/finished``, ``tokens``, ``time/step_s``, ``time/generate_s``,
``time/update_s``, ``update/positions``, ``throughput/tokens_per_s``, and ``eval/*`` on evaluation steps. GRPO adds
``episodes/*`` (``invalid``, ``invalid_rate``, ``invalid_total``, ``turns_mean``, ``malformed_actions``,
``truncated``), ``time/rollout_s``, ``time/engine_busy_s``, ``time/engine_idle_s`` (rollout time the
engine had no generation to do: waiting for the API) and, with a user simulator or judge, ``api/*``
(``trainer.llm.stats``); the step line shows the invalid episodes, the API calls and latency, and the idle time.
PPO adds ``loss/value``, ``value/clip_frac``, ``value/mean``, ``value/explained_variance``, ``adv/mean`` and
``critic/grad_norm``, and its step line reads like our users' PPO scripts:
``PL:0.3245 VL:0.1234 R:1.56 A:0.23 E:0.678 LR:1.00e-06`` (policy loss, value loss, reward, mean advantage
before whitening, entropy, learning rate).
Only global rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.3f}"


def step_line(m: dict[str, Any], total_steps: int, total_epochs: int, eta_s: float) -> str:
    parts = [f"step {m['step']}/{total_steps} epoch {m['epoch']}/{total_epochs}"]
    stats = []
    if "loss/value" in m:  # PPO: the columns of the seeds' PPO scripts, so their greps and eyes still work
        stats.append(f"PL:{m['loss/policy']:.4f} VL:{m['loss/value']:.4f} R:{m['reward/mean']:.2f} "
                     f"A:{m['adv/mean']:.2f} E:{m['entropy']:.3f} LR:{m['lr']:.2e}")  # fmt: skip
        shown = ("loss/policy", "reward/mean", "adv/abs_mean", "entropy", "lr")
        m = {k: v for k, v in m.items() if k not in shown}
    if "loss/sft" in m:
        stats.append(f"loss {_fmt(m['loss/sft'])}")
    if "loss/policy" in m:
        stats.append(f"loss {_fmt(m['loss/policy'])}")
    if "reward/mean" in m:
        stats.append(f"reward {m['reward/mean']:.2f}±{m['reward/std']:.2f}")
    for key, label in (("adv/abs_mean", "adv"), ("entropy", "entropy"), ("kl", "kl")):
        if key in m:
            stats.append(f"{label} {_fmt(m[key])}")
    if "lr" in m:
        stats.append(f"lr {m['lr']:.1e}")
    parts.append(" ".join(stats))
    # With a user simulator or judge: episodes lost to API failures, the API's health, the engine's idle time.
    if "episodes/invalid" in m and ("api/calls" in m or m.get("episodes/invalid_total")):
        episodes = [f"invalid {m['episodes/invalid']:.0f} ({m['episodes/invalid_rate']:.0%})"]
        if "api/calls" in m:
            episodes.append(f"api {m['api/calls']:.0f} calls {m['api/failed']:.0f} failed "
                            f"p50 {m['api/latency_p50_s']:.2f}s p95 {m['api/latency_p95_s']:.2f}s")  # fmt: skip
            if m.get("api/cost"):
                episodes.append(f"cost {m['api/cost']:.4g}")
        if "time/engine_idle_s" in m:
            episodes.append(f"idle {m['time/engine_idle_s']:.2f}s")
        parts.append(" ".join(episodes))
    if "eval/reward" in m:
        acc = f" accuracy {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
        parts.append(f"eval reward {m['eval/reward']:.3f}{acc}")
    parts.append(f"{m['time/step_s']:.2f} s/step {m.get('throughput/tokens_per_s', 0):.0f} tok/s")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes what rank 0 reports; every other rank gets a logger that does nothing."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0, wandb_cfg=None,
                 run_name: str = "", config: dict | None = None):  # fmt: skip
        self.enabled = enabled
        self.logs = Path(output_dir) / "logs"
        self.metrics_path = self.logs / "metrics.jsonl"
        self._start = time.monotonic()
        self._wandb = None
        self._log: TextIO | None = None
        if not enabled:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.metrics_path, resume_step)
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._log = (self.logs / "train.log").open("a", encoding="utf-8")
        if wandb_cfg is not None:
            self._wandb = _start_wandb(wandb_cfg, run_name, config)

    def info(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        if self._log:
            self._log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            self._log.flush()

    def step(self, metrics: dict[str, Any], line: str | None) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()
        if line is not None:
            self.info(line)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=metrics["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._log:
            self._log.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps after ``step``: a resumed run re-logs them, and a step must never appear twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _start_wandb(cfg, run_name: str, config: dict | None):
    try:
        import wandb
    except ModuleNotFoundError:
        from trainer.errors import UserError

        raise UserError(
            "logging.wandb", "wandb is not installed", hint="pip install wandb, or remove logging.wandb"
        ) from None
    return wandb.init(project=cfg.project, name=cfg.name or run_name, entity=cfg.entity, config=config)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


PLOTS = {
    "reward": ["reward/mean", "eval/reward"],
    "losses": ["loss/policy", "loss/total", "loss/sft"],
    "entropy": ["entropy", "kl"],
    "lr": ["lr"],
}


def write_plots(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per group in ``PLOTS`` plus ``training_metrics.png`` with all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {g: [k for k in keys if any(k in r for r in rows)] for g, keys in PLOTS.items()}
    groups = {g: keys for g, keys in groups.items() if keys}
    written = []
    fig_all, axes = plt.subplots(len(groups) or 1, 1, figsize=(7, 2.6 * max(1, len(groups))), squeeze=False)
    for ax_all, (group, keys) in zip(axes[:, 0], groups.items(), strict=False):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for target in (ax, ax_all):
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    target.plot(*zip(*pts, strict=True), label=key, marker="." if len(pts) < 30 else None)
            target.set_xlabel("step")
            target.set_title(group)
            target.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    fig_all.tight_layout()
    path = out_dir / "training_metrics.png"
    fig_all.savefig(path, dpi=90)
    plt.close(fig_all)
    written.append(path)
    return written
