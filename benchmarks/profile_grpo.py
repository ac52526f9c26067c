"""Where a userloop GRPO step spends its time: a py-spy sampling profile of ``python -m trainer``, bucketed.

Runs the GRPO benchmark's userloop command (same model, config and thread count as ``benchmarks.grpo_step``)
under ``py-spy record --format raw`` and attributes every sample of the training thread to the innermost
matching bucket below (a stack is read from the leaf up; the first bucket whose marker appears wins), so the
shares add up to 100 % of the process's samples:

    python -m benchmarks.profile_grpo [--mode full|lora] [--steps 30] [--quick] [--top 25]
    python -m benchmarks.profile_grpo --timeline [--mode full|lora]   # start-up / steps / exit of each process

Needs py-spy (the ``bench`` extra) and permission to ptrace its own child (the default for root and for
children on most Linux set-ups).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.common import bench_env
from benchmarks.grpo_step import FULL, QUICK, prepare

# (bucket, markers): a frame matches when it contains the marker ("function (path" as py-spy prints it).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer: clip_grad_norm_", ("clip_grad_norm_ (",)),
    ("optimizer: AdamW step", ("step (torch/optim/",)),
    ("backward", ("backward (torch/",)),
    ("loss: entropy + stats (policy_loss, no grad)", ("policy_loss (trainer/grpo.py",)),
    ("forward: model + log_softmax (token_logprobs)", ("token_logprobs (trainer/grpo.py",)),
    ("collate (trajectory_batch)", ("trajectory_batch (trainer/grpo.py",)),
    ("generate: HF model.generate", ("generate (transformers/generation/",)),
    ("generate: engine post-processing (decode, Completion)", ("_generate_batch (trainer/engines/hf.py",)),
    ("rollout: episodes, rewards, batcher (event loop thread excluded)", ("rollout (trainer/rollout.py",)),
    ("metrics, logging, end_step", ("end_step (trainer/session.py", "_rollout_metrics (", "step_metrics (")),
    ("start-up: Session.start (accelerate, data, model load)", ("start (trainer/session.py",)),
    ("start-up: EpisodeRunner (event loop, clients)", ("__init__ (trainer/rollout.py",)),
    ("finish / runner.close", ("finish (trainer/session.py", "close (trainer/rollout.py")),
    ("imports", ("_find_and_load (",)),
]


_SETUP = ("start (trainer/session.py", "__init__ (trainer/rollout.py", "_prepare (trainer/grpo.py",
          "finish (trainer/session.py", "close (trainer/rollout.py")  # fmt: skip


def in_loop(frames: list[str]) -> bool:
    """A sample of the step loop of ``trainer.grpo.train`` (not its set-up or its end)."""
    return any("train (trainer/grpo.py" in f for f in frames) and not any(
        m in f for f in frames for m in _SETUP
    )


def parse_raw(path: Path) -> tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """py-spy's raw (collapsed) output: ``frame;frame;...;leaf count`` per line, root first."""
    buckets: collections.Counter = collections.Counter()
    loop: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack_text.split(";") if f]
        total += n
        name = _bucket_in_order(frames) if frames else "no Python frame (interpreter start-up and exit)"
        buckets[name] += n
        if in_loop(frames):
            loop[name] += n
        leaves[frames[-1] if frames else "(none)"] += n
    return buckets, loop, leaves, total


def _bucket_in_order(frames: list[str]) -> str:
    # Innermost first: a sample inside AdamW inside end_step belongs to AdamW.
    for frame in reversed(frames):
        for name, markers in BUCKETS:
            if any(m in frame for m in markers):
                return name
    return "other"


def timeline(mode: str, threads: int, quick: bool) -> None:
    """Wall-clock phases of ``launcher run`` and of the floor: start-up, steps, interpreter exit.

    userloop: the first trainer line marks the end of start-up, step 1's line the first step, the ``done``
    line the end of training; what follows until the process is gone is the interpreter's exit.
    """
    import json
    import time

    from benchmarks.grpo_step import _launcher, _script_args

    s = replace(QUICK if quick else FULL, modes=(mode,))
    work = Path(tempfile.mkdtemp(prefix="userloop-timeline-"))
    try:
        paths = prepare(work, s)
        env = dict(bench_env(threads), PYTHONUNBUFFERED="1")
        runs = {
            "userloop (launcher run)": [_launcher(), "run", str(paths[f"config-{mode}"])],
            "floor": [
                sys.executable,
                "-m",
                "benchmarks.grpo_floor",
                *_script_args(paths, s, mode, work / "f.json"),
            ],
        }
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            marks: dict[str, float] = {}
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.perf_counter() - t0
                if line.startswith("userloop "):
                    marks.setdefault("start-up done", now)
                elif line.startswith("step 1/"):
                    marks["step 1 done"] = now
                elif line.startswith("done:"):
                    marks["training done"] = now
            proc.wait()
            total = time.perf_counter() - t0
            if name == "floor":
                d = json.loads((work / "f.json").read_text())
                first = d["in_process_s"] - sum(d["step_s"])
                marks = {"start-up done": first, "step 1 done": first + d["step_s"][0],
                         "training done": d["in_process_s"]}  # fmt: skip
            prev, parts = 0.0, []
            for label, at in marks.items():
                parts.append(f"{label} +{at - prev:.2f} s")
                prev = at
            print(f"{name}: {' | '.join(parts)} | exit +{total - prev:.2f} s | total {total:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("full", "lora"), default="full")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    )
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--top", type=int, default=20, help="leaf functions to list")
    ap.add_argument("--keep", type=Path, default=None, help="copy the raw profile here")
    ap.add_argument(
        "--timeline", action="store_true", help="phases of the userloop and floor processes instead"
    )
    args = ap.parse_args(argv)
    if args.timeline:
        timeline(args.mode, args.threads, args.quick)
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    s = replace(QUICK if args.quick else FULL, steps=args.steps, modes=(args.mode,))
    work = Path(tempfile.mkdtemp(prefix="userloop-profile-"))
    try:
        paths = prepare(work, s)
        raw = work / "profile.txt"
        cmd = [spy, "record", "--format", "raw", "-r", str(args.rate), "-o", str(raw), "--",
               sys.executable, "-m", "trainer", "--config", str(paths[f"config-{args.mode}"])]  # fmt: skip
        out = subprocess.run(cmd, env=bench_env(args.threads), capture_output=True, text=True)
        if out.returncode != 0 or not raw.exists():
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            return 1
        if args.keep:
            shutil.copy(raw, args.keep)
        buckets, loop, leaves, total = parse_raw(raw)
        print(f"{total} samples at {args.rate}/s ({total / args.rate:.1f} s), {s.steps} steps, mode {args.mode}, "
              f"OMP_NUM_THREADS={args.threads}\n")  # fmt: skip
        print("| bucket | share |\n|---|---:|")
        for name, n in buckets.most_common():
            print(f"| {name} | {100 * n / total:.1f} % |")
        in_steps = sum(loop.values())
        print(
            f"\nWithin the step loop ({in_steps / args.rate:.1f} s, {100 * in_steps / total:.0f} % of the samples):\n"
        )
        print("| bucket | share of the loop |\n|---|---:|")
        for name, n in loop.most_common():
            print(f"| {name} | {100 * n / max(in_steps, 1):.1f} % |")
        print(f"\nTop {args.top} leaf frames:")
        for frame, n in leaves.most_common(args.top):
            print(f"{100 * n / total:5.1f} %  {frame}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
