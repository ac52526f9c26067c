"""Step lines for ``kubectl logs``, ``logs/metrics.jsonl``, ``logs/train.log``, plots and optional wandb.

One plain line per step on stdout (no progress bars, no colour), e.g.::

    step 12/50 epoch 1/10 | loss 0.324 reward 1.56±0.30 adv 0.23 entropy 0.678 kl 0.010 lr 1.0e-06 | 3.1 s/step 420 tok/s | eta 2m30s

Metric keys (metrics.jsonl, one JSON object per step; README documents each):
``step``, ``epoch``, ``loss/policy``, ``loss/total``, ``loss/sft``, ``reward/mean``, ``reward/std``,
``reward/<name>``, ``adv/abs_mean``, ``entropy``, ``kl``, ``clip_frac``, ``grad_norm``, ``lr``,
``completion/len_mean``, ``completion/finished``, ``tokens``, ``rollout/logprob_diff`` and
``rollout/tis_clip_frac`` (engines that report log-probs; on the step line as ``logprob_diff 0.012 tis_clip
0.4%``), ``time/step_s``, ``time/generate_s``,
``time/update_s``, ``update/positions``, ``throughput/tokens_per_s``, and ``eval/*`` on evaluation steps. GRPO adds
``episodes/*`` (``invalid``, ``invalid_rate``, ``invalid_total``, ``turns_mean``, ``malformed_actions``,
``truncated``, ``user_faults``: episodes a misbehaving user simulator spoiled, excluded but not invalid,
``tool_errors``: failed tool calls of tau2 episodes), ``time/rollout_s``, ``time/engine_busy_s``, ``time/engine_idle_s`` (rollout time the
engine had no generation to do: waiting for the API) and, with a user simulator or judge, ``api/*``
(``trainer.llm.stats``; a ``backend: local`` model is counted there too, marked by ``local/<role>`` = 1); the
step line shows the invalid episodes, each local backend's generations (``local user 60 calls 0 failed p50
0.17s p95 0.18s``), the API calls and latency over the API backends (``api 120 calls 3 failed p50 ...``), and
the idle time.
PPO adds ``loss/value``, ``value/clip_frac``, ``value/mean``, ``value/explained_variance``, ``adv/mean`` and
``critic/grad_norm``, and its step line reads like our users' PPO scripts:
``PL:0.3245 VL:0.1234 R:1.56 A:0.23 E:0.678 LR:1.00e-06`` (policy loss, value loss, reward, mean advantage
before whitening, entropy, learning rate).
Plots (``write_plots``, at the end of a run and ``launcher plots RUN_DIR``): ``reward.png``, ``api_health.png``
(calls and failures per step per backend, invalid episodes, latency; only with a user simulator or judge),
``losses.png``, ``signals.png`` (grad_norm, kl, clip_frac, entropy), ``lr.png`` and ``training_metrics.png``
with all of these.
Only global rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
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
    # A server engine's sampling mismatch and how much truncated importance sampling capped (algorithm.tis_cap).
    if "rollout/logprob_diff" in m:
        stats.append(f"logprob_diff {_fmt(m['rollout/logprob_diff'])}")
    if "rollout/tis_clip_frac" in m:
        stats.append(f"tis_clip {m['rollout/tis_clip_frac']:.1%}")
    if "lr" in m:
        stats.append(f"lr {m['lr']:.1e}")
    parts.append(" ".join(stats))
    # With a user simulator or judge: episodes lost to API failures, the backends' health, the engine's idle time.
    if "episodes/invalid" in m and ("api/calls" in m or m.get("episodes/invalid_total")):
        episodes = [f"invalid {m['episodes/invalid']:.0f} ({m['episodes/invalid_rate']:.0%})", *_backends(m)]
        if "time/engine_idle_s" in m:
            episodes.append(f"idle {m['time/engine_idle_s']:.2f}s")
        parts.append(" ".join(episodes))
    if "eval/reward" in m:
        acc = f" accuracy {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
        parts.append(f"eval reward {m['eval/reward']:.3f}{acc}")
    parts.append(f"{m['time/step_s']:.2f} s/step {m.get('throughput/tokens_per_s', 0):.0f} tok/s")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


_ROLE_LABELS = {"user_simulator": "user", "judge": "judge"}
_CALL_KEYS = ("calls", "failed", "latency_p50_s", "latency_p95_s")


def _calls(label: str, calls: float, failed: float, p50: float, p95: float) -> str:
    return f"{label} {calls:.0f} calls {failed:.0f} failed p50 {p50:.2f}s p95 {p95:.2f}s"


def _backends(m: dict[str, Any]) -> list[str]:
    """``local user 60 calls ...`` for each in-process backend (``local/<role>``), then ``api N calls ...`` over
    the API backends: the ``api/*`` totals count both, and a local model's generations are no API calls."""
    if "api/calls" not in m:
        return []
    roles = [
        k.split("/")[1] for k in m if k.count("/") == 2 and k.startswith("api/") and k.endswith("/calls")
    ]
    local = [r for r in roles if m.get(f"local/{r}")]
    remote = [r for r in roles if r not in local]
    out = []
    for r in local:
        out.append(_calls(f"local {_ROLE_LABELS.get(r, r)}", *(m[f"api/{r}/{k}"] for k in _CALL_KEYS)))
    if not local:  # every backend is an API (or metrics from before per-backend keys): the totals are theirs
        out.append(_calls("api", *(m[f"api/{k}"] for k in _CALL_KEYS)))
    elif remote:
        # Percentiles do not add up: with several API backends beside a local one, show the slowest's.
        calls, failed = (sum(m[f"api/{r}/{k}"] for r in remote) for k in ("calls", "failed"))
        p50, p95 = (max(m[f"api/{r}/{k}"] for r in remote) for k in ("latency_p50_s", "latency_p95_s"))
        out.append(_calls("api", calls, failed, p50, p95))
    if m.get("api/cost"):  # local backends cost nothing: the total is the APIs'
        out.append(f"cost {m['api/cost']:.4g}")
    return out


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

    def info(self, line: str, echo: bool = True) -> None:
        """``line`` to ``logs/train.log`` and, with ``echo``, to stdout (``echo=False``: long records such as the
        resolved config, which would bury the step lines of a terminal or a notebook)."""
        if not self.enabled:
            return
        if echo:
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


# ----------------------------------------------------------------------------- plots
#
# plots/reward.png, api_health.png (runs with a user simulator or judge), losses.png, signals.png, lr.png, and
# training_metrics.png with every panel (API health beside the reward). A panel is drawn from metrics.jsonl,
# plus the run's config.yaml where a metric needs its setting to be read right (one update pass, kl_coef 0).

Points = list[tuple[int, float]]


@dataclass
class Panel:
    title: str
    series: list[tuple[str, Points]]  # (label, [(step, value)]); empty series are dropped
    ylabel: str = ""
    note: str = ""  # drawn inside the axes: why a curve looks the way it does
    band: tuple[Points, Points] | None = None  # (lower, upper) around the first series, e.g. reward ± std
    hline: tuple[str, float] | None = None  # (label, y), e.g. the gradient clipping threshold


def _points(rows: list[dict[str, Any]], key: str) -> Points:
    return [(r["step"], float(v)) for r in rows if isinstance(v := r.get(key), (int, float)) and "step" in r]


def _per_step(rows: list[dict[str, Any]], key: str) -> Points:
    """Increments of a cumulative counter (``api/*/calls``); a drop (counters restarted) counts from 0."""
    out, prev = [], 0.0
    for step, value in _points(rows, key):
        out.append((step, value - prev if value >= prev else value))
        prev = value
    return out


def _run_config(metrics_path: Path) -> dict[str, Any]:
    """The run's resolved config (``<output_dir>/config.yaml`` beside ``logs/``); {} when absent or unreadable."""
    import yaml

    path = metrics_path.parent.parent / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


SINGLE_PASS_NOTE = (
    "updates_per_batch = 1: ratio 1, so loss/policy = -(token-weighted mean advantage), ~0 by construction;\n"
    "its gradient is not 0. Read grad_norm, kl, entropy (signals.png) and the reward instead."
)


def _api_panels(rows: list[dict[str, Any]]) -> list[Panel]:
    """Per backend: calls and failures per step, latency; invalid episodes. [] without a user simulator or judge."""
    roles = list(dict.fromkeys(k.split("/")[1] for r in rows for k in r
                               if k.count("/") == 2 and k.startswith("api/") and k.endswith("/calls")))  # fmt: skip
    if not roles and not any("api/calls" in r for r in rows):
        return []
    if not roles:
        roles = [""]  # metrics from before per-backend keys: the totals
    names = {}
    for role in roles:
        local = any(r.get(f"local/{role}") for r in rows)
        names[role] = f"{role or 'api'} ({'local model' if local else 'API'})"

    def key(role: str, name: str) -> str:
        return f"api/{role}/{name}" if role else f"api/{name}"

    calls = Panel("calls per step", [(names[r], _per_step(rows, key(r, "calls"))) for r in roles], "calls")
    if any("eval/samples" in r for r in rows):
        # The counters are read before a step's evaluation runs: its calls land in the next step.
        calls.note = "An evaluation's calls count in the step after it."
    failures = Panel(
        "failures per step",
        [(f"{names[r]} failed", _per_step(rows, key(r, "failed"))) for r in roles]
        + [(f"{names[r]} retries", _per_step(rows, key(r, "retries"))) for r in roles]
        + [("invalid episodes", _points(rows, "episodes/invalid"))],
        "count",
    )
    latency = Panel(
        "latency of one call",
        [(f"{names[r]} {q}", _points(rows, key(r, f"latency_{q}_s"))) for r in roles for q in ("p50", "p95")],
        "seconds",
    )
    return [calls, failures, latency]


def _loss_panel(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> Panel:
    algo = cfg.get("algorithm") or {}
    policy, total = _points(rows, "loss/policy"), _points(rows, "loss/total")
    series = [("loss/sft", _points(rows, "loss/sft")), ("loss/value", _points(rows, "loss/value"))]
    if policy and policy == total:  # no KL, entropy or value term: one curve, not two on top of each other
        series.append(("loss/total (= loss/policy)", total))
    else:
        series += [("loss/total", total), ("loss/policy", policy)]
    single = bool(policy) and algo.get("name") in ("grpo", "ppo") and algo.get("updates_per_batch") == 1
    return Panel("losses", series, note=SINGLE_PASS_NOTE if single else "")


def _signal_panels(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> list[Panel]:
    algo = cfg.get("algorithm") or {}
    clip = algo.get("max_grad_norm")
    single = algo.get("updates_per_batch") == 1
    return [
        Panel("grad_norm (before clipping)",
              [("policy", _points(rows, "grad_norm")), ("critic", _points(rows, "critic/grad_norm"))],
              hline=("max_grad_norm", float(clip)) if isinstance(clip, (int, float)) else None),
        Panel("kl to the reference (k3)" + (": kl_coef 0, not computed" if algo.get("kl_coef") == 0 else ""),
              [("kl", _points(rows, "kl"))]),
        Panel("clip_frac" + (": 0 with one update pass (ratio 1)" if single else ""),
              [("policy", _points(rows, "clip_frac")), ("value", _points(rows, "value/clip_frac"))]),
        Panel("entropy per completion token", [("entropy", _points(rows, "entropy"))]),
        Panel("value/explained_variance (1 = perfect critic)",
              [("explained variance", _points(rows, "value/explained_variance"))]),
    ]  # fmt: skip


def _reward_panel(rows: list[dict[str, Any]]) -> Panel:
    mean = _points(rows, "reward/mean")
    std = dict(_points(rows, "reward/std"))
    band = None
    if std and mean:
        band = ([(s, v - std.get(s, 0.0)) for s, v in mean], [(s, v + std.get(s, 0.0)) for s, v in mean])
    series = [
        ("reward/mean ± std" if band else "reward/mean", mean),
        ("eval/reward", _points(rows, "eval/reward")),
    ]
    return Panel("reward", series, band=band)


def plot_panels(rows: list[dict[str, Any]], cfg: dict[str, Any] | None = None) -> dict[str, list[Panel]]:
    """``{file stem: panels}`` with data; the keys are the PNG names ``write_plots`` writes (and no others)."""
    cfg = cfg or {}
    files = {
        "reward": [_reward_panel(rows)],
        "api_health": _api_panels(rows),
        "losses": [_loss_panel(rows, cfg)],
        "signals": _signal_panels(rows, cfg),
        "lr": [Panel("learning rate", [("lr", _points(rows, "lr"))])],
    }
    for panels in files.values():
        for panel in panels:
            panel.series = [(label, pts) for label, pts in panel.series if pts]
    return {name: kept for name, panels in files.items() if (kept := [p for p in panels if p.series])}


def _draw(ax, panel: Panel) -> None:
    from matplotlib.ticker import MaxNLocator

    for i, (label, pts) in enumerate(panel.series):
        xs, ys = zip(*pts, strict=True)
        # Sparse series (eval every N steps, short runs) need markers to be seen at all.
        ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, markersize=3)
        if i == 0 and panel.band is not None:
            (xl, lo), (_, hi) = zip(*panel.band[0], strict=True), zip(*panel.band[1], strict=True)
            ax.fill_between(xl, lo, hi, alpha=0.2, linewidth=0)
    if panel.hline is not None:
        ax.axhline(panel.hline[1], color="grey", linestyle="--", linewidth=1, label=panel.hline[0])
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel("step")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="x-small")
    if panel.note:  # under the x label, not over the curve
        ax.annotate(panel.note, xy=(0, 0), xycoords="axes fraction", xytext=(0, -40), textcoords="offset points",
                    va="top", fontsize="x-small", bbox={"boxstyle": "round", "facecolor": "lightyellow"})  # fmt: skip


def _figure(panels: list[Panel], ncols: int, width: float = 7.0, height: float = 3.2):
    import matplotlib.pyplot as plt

    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw(ax, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def write_plots(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per entry of ``plot_panels`` plus ``training_metrics.png`` with all their panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    files = plot_panels(read_metrics(metrics_path), _run_config(metrics_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panels in files.items():
        fig = _figure(panels, ncols=1 if len(panels) < 4 else 2)
        written.append(out_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    # Reward first and API health next to it: a reward drop that coincides with failures is the API's.
    fig = _figure([p for panels in files.values() for p in panels] or [Panel("no metrics yet", [])], ncols=2)
    written.append(out_dir / "training_metrics.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written
