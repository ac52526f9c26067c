"""Run userloop's benchmarks and, with ``--write``, rewrite their tables in docs/benchmarks.md.

    python -m benchmarks.run                    # everything, full settings (~15 min on 2 CPU cores)
    python -m benchmarks.run --quick            # tiny settings: checks that every benchmark runs (~1 min)
    python -m benchmarks.run --only grpo --only api --write
    make bench                                  # = pip install -e '.[dev,bench]' && python -m benchmarks.run --write

Benchmarks (``--only`` names), each a section of docs/benchmarks.md:

- ``grpo``: GRPO step throughput, userloop (``launcher run``) vs TRL's GRPOTrainer vs the floor (bare
  generate + forward/backward), full fine-tuning and LoRA (``benchmarks.grpo_step``);
- ``logprobs``: the GRPO update's loss head at Qwen3's 151,936-token vocabulary, time and peak memory,
  userloop vs TRL vs the plain log-softmax (``benchmarks.logprob_head``);
- ``api``: API client calls/s against C / L, client CPU per call, GIL cost to a busy loop (``benchmarks.api_client``);
- ``checkpoint``: checkpoint save/load against raw disk bandwidth, step blocking (``benchmarks.checkpoint_io``);
- ``launcher``: cold start of ``launcher --help / render / validate`` (``benchmarks.launcher_cold_start``);
- ``overlap``: multi-turn rollout overlap against its bound and the turn-synchronous loop
  (``benchmarks.multiturn_overlap``);
- ``vllm``: GRPO step time with the ``hf`` engine against the real vLLM server (``.venv-vllm``), side by side on
  the tiny model: rollout, weight hand-over and update per step (``benchmarks.rollout_engines``); without a
  vLLM environment it records that it was not measured;
- ``gpu``: userloop vs TRL on a Qwen3-0.6B-sized model on a GPU: generation and update tokens/s, MFU of the
  update (``benchmarks.gpu``); without a CUDA device it records what was not measured and why (``--quick``:
  the same path on the CPU with a tiny model).

Compared commands run interleaved (A B A B ...) so that drift of the machine lands on all of them; every
figure is a median. ``OMP_NUM_THREADS`` is set to ``--threads`` (default: the CPU count) for every timed
process. Quick results never go into the real docs unless ``--docs`` names another file.
Benchmarks are never timed assertions in the tests: tests/test_benchmarks_smoke.py only runs ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import DOCS, REPO, write_section

NAMES = ("grpo", "logprobs", "api", "checkpoint", "launcher", "overlap", "vllm", "gpu")


def _grpo(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from benchmarks import grpo_step

    s = grpo_step.with_rounds(grpo_step.QUICK if quick else grpo_step.FULL, rounds)
    res = grpo_step.bench(s, threads, log=log)
    return grpo_step.HEADING, grpo_step.section(res, _command("grpo", quick, threads, rounds)), res


def _logprobs(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from dataclasses import replace

    from benchmarks import logprob_head

    s = logprob_head.QUICK if quick else logprob_head.FULL
    s = s if rounds is None else replace(s, rounds=rounds)
    res = logprob_head.bench(s, threads, log=log)
    return logprob_head.HEADING, logprob_head.section(res, _command("logprobs", quick, threads, rounds)), res


def _api(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from dataclasses import replace

    from benchmarks import api_client

    s = api_client.QUICK if quick else api_client.FULL
    s = s if rounds is None else replace(s, rounds=rounds)
    res = api_client.bench(s, threads, log=log)
    return api_client.HEADING, api_client.section(res, _command("api", quick, threads, rounds)), res


def _checkpoint(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from dataclasses import replace

    from benchmarks import checkpoint_io

    s = checkpoint_io.QUICK if quick else checkpoint_io.FULL
    s = s if rounds is None else replace(s, rounds=rounds)
    res = checkpoint_io.bench(s, threads, log=log)
    return (
        checkpoint_io.HEADING,
        checkpoint_io.section(res, _command("checkpoint", quick, threads, rounds)),
        res,
    )


def _launcher(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from benchmarks import launcher_cold_start as lcs

    runs = rounds or (1 if quick else 9)
    rows = lcs.measure(runs)
    text = lcs.table(rows, runs, command=_command("launcher", quick, threads, rounds))
    return lcs.HEADING, text, {"rows": rows}


def _overlap(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from benchmarks import multiturn_overlap as mo

    latencies, episodes, turns = ([0.05], 8, 2) if quick else ([0.2, 1.0, 3.0], 64, 4)
    results = []
    for latency in latencies:
        results.append(mo.bench(latency, episodes, turns))
        log(f"overlap: {json.dumps(results[-1])}")
    text = mo.section(results, episodes, turns).rstrip("\n")
    text += f"\n\nReproduce with `{_command('overlap', quick, threads, rounds)}`.\n"
    return mo.HEADING, text, {"results": results}


def _vllm(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from benchmarks import rollout_engines as re_

    s = re_.with_rounds(re_.QUICK if quick else re_.FULL, rounds)
    res = re_.bench(s, threads, log=log)
    return re_.HEADING, re_.section(res, _command("vllm", quick, threads, rounds)), res


GPU_HEADING = "## GPU (H200 class)"


def _gpu(quick: bool, threads: int, rounds: int | None, log) -> tuple[str, str, dict]:
    from dataclasses import replace

    from benchmarks import gpu

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    command = _command("gpu", quick, threads, rounds)
    if not quick and not cuda:
        why = "no GPU was lent to the session that ran this"
        text = gpu.not_measured(command, f"pip install -e '.[dev,bench]' && {gpu.DEVICE_COMMAND}", why)
        return GPU_HEADING, text, {"cuda": False, "measured": False}
    s = gpu.QUICK if quick else gpu.FULL
    s = s if rounds is None else replace(s, rounds=rounds)
    peak = float(os.environ[gpu.PEAK_ENV]) if os.environ.get(gpu.PEAK_ENV) else None
    res = gpu.bench(s, threads, peak, log=log)
    return GPU_HEADING, gpu.section(res, command), {**res, "cuda": cuda, "measured": True}


RUNNERS: dict[str, Callable] = {"grpo": _grpo, "logprobs": _logprobs, "api": _api, "checkpoint": _checkpoint, "launcher": _launcher,
                                "overlap": _overlap, "vllm": _vllm, "gpu": _gpu}  # fmt: skip
_ARGV: list[str] = []


def _command(name: str, quick: bool, threads: int, rounds: int | None) -> str:
    parts = ["python -m benchmarks.run", "--only", name]
    if quick:
        parts.append("--quick")
    if rounds is not None:
        parts += ["--rounds", str(rounds)]
    return f"OMP_NUM_THREADS={threads} " + " ".join(parts) + " --write"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke check, not a measurement)")
    ap.add_argument("--only", action="append", choices=NAMES, help="run only this benchmark (repeatable)")
    ap.add_argument("--write", action="store_true", help="rewrite the benchmarks' sections of --docs")
    ap.add_argument("--docs", type=Path, default=None, help=f"the file --write updates (default {DOCS})")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every timed process "
                    "(default: $OMP_NUM_THREADS, else the CPU count)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (runs per command)")
    ap.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    args = ap.parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before this process imports torch
    docs = args.docs or DOCS
    if args.write and args.quick and args.docs is None:
        ap.error("--quick --write would put smoke-test figures into docs/benchmarks.md; add --docs PATH")
    names = args.only or list(NAMES)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    raw: dict[str, dict] = {}
    failed: list[str] = []

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    for name in names:
        t0 = time.perf_counter()
        log(f"{name}: start ({'quick' if args.quick else 'full'} settings, OMP_NUM_THREADS={threads})")
        try:
            heading, text, res = RUNNERS[name](args.quick, threads, args.rounds, log)
        except Exception:
            failed.append(name)
            log(f"{name}: FAILED\n{traceback.format_exc()}")
            continue
        raw[name] = res
        print(text, flush=True)
        if args.write:
            write_section(heading, text, docs)
            log(f"{name}: wrote {heading!r} in {docs}")
        log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if failed:
        log(f"failed: {', '.join(failed)} (command: {shlex.join(sys.argv)})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
