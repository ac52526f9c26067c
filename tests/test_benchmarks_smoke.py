"""Every benchmark runs on its tiny setting and produces its table; no timing is asserted (benchmarks/run.py).

Two subprocesses run ``python -m benchmarks.run --quick --write --docs <tmp>`` side by side (the GRPO
benchmark in one, the others in the other; ~35 s on 2 CPU cores instead of ~55 s one after the other):
fresh processes, as ``make bench`` runs them, and the test process's torch settings stay untouched. TRL is optional (the ``bench`` extra): without it the GRPO table says so instead of a TRL row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SECTIONS = {
    "grpo": ("## GRPO step throughput: userloop vs TRL vs the floor", "| full | floor |"),
    "api": ("## API client throughput", "| calls from this process's `LoopThread` |"),
    "checkpoint": ("## Checkpoint I/O", "| `checkpoint.save` |"),
    "launcher": ("## Launcher cold start", "| `launcher --help` |"),
    "overlap": ("## Multi-turn overlap", "| L (s) |"),
    "gpu": ("## GPU (H200 class)", "MFU"),
}


def test_every_benchmark_runs_quick_and_writes_its_table(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Hand-written notes\n\nkept\n")
    raw = tmp_path / "raw.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--write",
        "--docs",
        str(docs),
        "--json",
        str(raw),
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    text = docs.read_text()
    assert "## Hand-written notes\n\nkept" in text  # other sections are left alone
    for name, (heading, row) in SECTIONS.items():
        assert text.count(heading) == 1, name
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert row in section, (name, section[:2000])
    assert set(json.loads(raw.read_text())) == set(SECTIONS)
