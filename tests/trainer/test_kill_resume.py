"""SIGKILL at random moments, checkpoint writes included, then restart: every restart resumes from the
newest *complete* checkpoint, a partial one is never loaded, and metrics.jsonl never shows a step twice."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import checkpoint
from trainer.config import load_config

TRIALS = 20


@pytest.mark.slow
def test_random_sigkills_always_resume_from_a_complete_checkpoint(make_config) -> None:
    rng = random.Random(1234)
    path = make_config("kills", algorithm__max_steps=60, checkpoint__save_every_steps=2, checkpoint__keep_last=3,
                       eval={}, logging={"every_steps": 1, "plots": False})  # fmt: skip
    cfg = load_config(path)
    cmd = [sys.executable, "-m", "trainer", "--config", str(path)]
    kills = during_save = 0
    for _ in range(TRIALS):
        expected = checkpoint.latest(cfg.output_dir)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = rng.randint(1, 6)  # kill after this many step lines of this start
        seen, first = 0, None
        for line in proc.stdout:
            first = first or (line if line.startswith(("resumed", "step ")) else None)
            if line.startswith("step "):
                seen += 1
                if seen == target:
                    step = int(line.split()[1].split("/")[0])
                    # Even steps are followed by a save: land inside it some of the time.
                    time.sleep(rng.uniform(0, 0.05))
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    during_save += step % 2 == 0
                    break
        proc.wait(timeout=60)
        proc.stdout.close()
        if expected is None:
            assert first is not None and first.startswith("step 1/"), first
        else:
            want = f"resumed from {expected} at step {int(expected.name.split('_')[1])}"
            assert first is not None and first.startswith(want), (first, want)
        if proc.returncode == 0:  # finished before the kill
            break
    assert kills >= 15 and during_save >= 3, (kills, during_save)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    steps = [
        json.loads(x)["step"]
        for x in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 61))
    root = checkpoint.checkpoints_dir(cfg.output_dir)
    assert all(re.fullmatch(r"step_\d+", p.name) for p in root.iterdir())  # no partial save left behind
    assert all(checkpoint.verify_manifest(p) is None for _, p in checkpoint.complete_checkpoints(root))
