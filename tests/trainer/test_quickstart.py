"""The README's main command, as a user runs it: ``launcher run configs/quickstart.yaml`` on a fresh directory.

It must build its tiny model and data on first use, learn visibly, checkpoint, and continue (not
restart) when run again with more steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher", "run", str(REPO / "configs" / "quickstart.yaml"), *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_quickstart_learns_checkpoints_and_resumes(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "quickstart"
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 151))
    fifth = len(rows) // 5
    first = sum(r["reward/mean"] for r in rows[:fifth]) / fifth
    last = sum(r["reward/mean"] for r in rows[-fifth:]) / fifth
    assert last > first + 0.5, (first, last)
    step_dir = out / "checkpoints" / "step_150"
    assert {"policy", "training_state.pt", "config.yaml"} <= {p.name for p in step_dir.iterdir()}
    # One plain line per step for `kubectl logs`: no carriage returns, no progress bars.
    assert "\r" not in proc.stdout + proc.stderr
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == 150

    proc = _run(tmp_path, "--set", "algorithm.max_steps=160")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from runs/quickstart/checkpoints/step_150 at step 150" in proc.stdout
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == "151/160" and steps[-1] == "160/160"
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 161))
