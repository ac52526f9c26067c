"""The GRPO update at Qwen3's vocabulary: time and memory of the loss head, userloop vs TRL vs plain.

The GRPO step benchmark's model has a 160-token vocabulary, where the log-softmax costs nothing. Qwen3's
has 151,936 tokens, and there the LM head and the log-softmax over its output dominate memory and a good
share of the update: one float32 copy of the logits is 600 MB per 1,000 positions. This benchmark runs the
update's forward and backward on a Qwen3-architecture model with that vocabulary and a small body, each
command in its own process so that its peak memory is its own:

- *userloop*: ``trainer.grpo.token_logprobs`` (logits only at the trained positions through
  ``logits_to_keep``, chunked log-prob and entropy, ``trainer.logprobs``);
- *trl*: TRL's GRPOTrainer path (``add_fused_lm_head`` and ``model(..., labels=..., fused_lm_head=True)``,
  log-probs and entropy; TRL scores only the labelled positions on Triton devices, every position elsewhere);
- *plain*: full logits, ``log_softmax`` in float32, ``gather``, entropy from the log-softmax: what
  ``token_logprobs`` did before issue 6's third pass.

Loss: the policy-gradient term over the completion tokens (advantage +-1, ratio against detached log-probs),
entropy as a metric (no gradient), as a GRPO step with ``entropy_coef`` 0 computes it. Reported: the median
update time (forward + loss + backward) over the measured iterations, and the peak memory above the
process's resident set before the first update (CPU: peak RSS; CUDA: ``max_memory_allocated``).

    python -m benchmarks.logprob_head --command userloop --out r.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import (
    bench_env,
    code_version,
    fmt,
    interleave,
    load_average,
    machine,
    run_timed,
    utc_now,
    versions,
)

HEADING = "## GRPO update at Qwen3's vocabulary: loss head time and memory"
COMMANDS = ("userloop", "trl", "plain")


@dataclass(frozen=True)
class Settings:
    vocab: int = 151_936  # Qwen3's
    hidden: int = 256
    layers: int = 2
    batch: int = 16  # sequences (e.g. 2 prompts x group 8)
    prompt: int = 48  # tokens before the completion (system prompt, task, earlier turns)
    completion: int = 48
    iters: int = 3  # measured updates per process, after one warm-up
    rounds: int = 3
    temperature: float = 1.0


FULL = Settings()
QUICK = Settings(vocab=4096, hidden=32, layers=1, batch=4, prompt=8, completion=8, iters=1, rounds=1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(command: str, s: Settings) -> dict:
    """One process's measurement (runs in the child)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=3 * s.hidden,
                         num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=s.hidden // 4, tie_word_embeddings=True, attention_dropout=0.0)  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    length = s.prompt + s.completion
    ids = torch.randint(0, s.vocab, (s.batch, length), device=device)
    attention = torch.ones_like(ids)
    mask = torch.zeros(s.batch, length - 1, device=device)
    mask[:, s.prompt - 1 :] = 1  # targets s.prompt .. length-1: the completion
    adv = torch.tensor([1.0, -1.0] * (s.batch // 2), device=device)[:, None]
    n = float(mask.sum())

    if command == "userloop":
        from trainer.grpo import collate, token_logprobs

        batch = collate(
            ids.tolist(), [[0] * s.prompt + [1] * s.completion] * s.batch, adv[:, 0].tolist(), 0, device
        )

        def logprobs() -> tuple[torch.Tensor, torch.Tensor]:
            return token_logprobs(model, batch, s.temperature)
    elif command == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=s.temperature, outputs=("log_probs", "entropy"))
        labels = ids.clone()
        labels[:, : s.prompt] = -100  # TRL shifts them: position t is scored on label t+1

        def logprobs() -> tuple[torch.Tensor, torch.Tensor]:
            out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
            return out.log_probs, out.entropy
    elif command == "plain":
        import torch.nn.functional as F

        def logprobs() -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / s.temperature
            logp_all = F.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp, entropy
    else:
        raise ValueError(command)

    def update() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp, entropy = logprobs()
        ratio = torch.exp(logp - logp.detach())
        loss = -(ratio * adv * mask).sum() / n
        loss.backward()
        float((entropy.detach() * mask).sum() / n)  # the step's entropy metric
        if cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    with torch.no_grad():  # what the update computes, for the check that the commands agree
        logp, entropy = logprobs()
        check = [float((logp * mask).sum() / n), float((entropy * mask).sum() / n)]
    update()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = [update() for _ in range(s.iters)]
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_bytes()) - base
    return {"command": command, "update_s": statistics.median(times), "times": times, "peak_mb": peak / 1e6,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
            "trained_tokens": int(n), "mean_logp_entropy": check}  # fmt: skip


def bench(s: Settings, threads: int, log=print) -> dict:
    try:
        import trl  # noqa: F401

        commands = list(COMMANDS)
    except ImportError:
        commands = [c for c in COMMANDS if c != "trl"]
    env = bench_env(threads)
    tmp = Path(tempfile.mkdtemp(prefix="logprob-head-"))
    settings = json.dumps(asdict(s))

    def runner(command: str):
        def run(r: int) -> dict:
            out = tmp / f"{command}-{r}.json"
            run_timed([sys.executable, "-m", "benchmarks.logprob_head", "--command", command, "--settings",
                       settings, "--out", str(out)], env=env)  # fmt: skip
            res = json.loads(out.read_text())
            log(
                f"logprobs: {command} round {r}: update {res['update_s']:.3f} s, peak +{res['peak_mb']:.0f} MB"
            )
            return res

        return run

    runs = interleave({c: runner(c) for c in commands}, s.rounds)
    return {"settings": asdict(s), "threads": threads, "runs": runs, "when": utc_now(), "code": code_version(),
            "load": load_average()}  # fmt: skip


def section(res: dict, command: str) -> str:
    s = Settings(**res["settings"])
    runs = res["runs"]
    med = {c: (statistics.median(r["update_s"] for r in rs), statistics.median(r["peak_mb"] for r in rs))
           for c, rs in runs.items()}  # fmt: skip
    first = next(iter(runs.values()))[0]
    plain_t, plain_m = med.get("plain", (float("nan"), float("nan")))
    lines = [
        HEADING,
        "",
        f"Measured {res['when']} ({res['code']}) with `{command}` (load average at the end {res['load']}).",
        f"Machine: {machine()}. {versions('torch', 'transformers', 'trl')}. "
        f"`OMP_NUM_THREADS={res['threads']}`.",
        "",
        f"What: the update's forward, policy-gradient loss and backward (entropy as a metric) on a Qwen3-"
        f"architecture model with a {s.vocab:,}-token vocabulary and a small body (hidden {s.hidden}, {s.layers} "
        f"layers, tied embeddings, {first['dtype']} on {first['device']}), {s.batch} sequences of {s.prompt} "
        f"prompt + {s.completion} completion tokens ({first['trained_tokens']} trained tokens), temperature "
        f"{s.temperature}. Each command in its own process, {s.rounds} interleaved rounds, {s.iters} measured "
        f"updates after one warm-up per process; medians. *peak memory*: the most the process held during the "
        f"updates above its resident set before them (CPU: peak RSS; CUDA: `max_memory_allocated`). Code and "
        f"the compared paths: `benchmarks/logprob_head.py`.",
        "",
        "| command | update (s) | vs plain | peak memory (MB) | vs plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in runs:
        t, m = med[c]
        lines.append(f"| {c} | {fmt(t, 3)} | {fmt(t / plain_t)} | {m:,.0f} | {fmt(m / plain_m)} |")
    checks = {c: rs[0]["mean_logp_entropy"] for c, rs in runs.items()}
    lines += [
        "",
        "The commands compute the same numbers (mean log-prob and entropy over the trained tokens, first "
        "round): " + ", ".join(f"{c} {v[0]:.5f} / {v[1]:.5f}" for c, v in checks.items()) + ".",
    ]
    lines += ["", "Per-round update times (s) and peaks (MB): " + "; ".join(
        f"{c} {[round(r['update_s'], 3) for r in rs]} {[round(r['peak_mb']) for r in rs]}" for c, rs in runs.items()
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--command", choices=COMMANDS, required=True)
    ap.add_argument("--settings", default=None, help="Settings as JSON (default: the full settings)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.settings:
        s = replace(s, **json.loads(args.settings))
    Path(args.out).write_text(json.dumps(measure(args.command, s)))


if __name__ == "__main__":
    main()
