"""Every benchmark runs on its tiny setting and produces its table; no timing is asserted (benchmarks/run.py).

Two subprocesses run ``python -m benchmarks.run --quick --write --docs <tmp>`` side by side, half of
the benchmarks each (~40 s on 2 idle CPU cores, ~55 s one after the other): fresh processes, as
``make bench`` runs them, and the test process's torch settings stay untouched. TRL is optional (the
``bench`` extra): without it the GRPO table says so instead of a TRL row. So is vLLM (``.venv-vllm``,
scripts/vllm_venv.sh): without it its section says it was not measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The end-to-end tier (`make test-slow`): every benchmark once, ~75 s.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _vllm_row() -> str:
    """The real vLLM server runs when .venv-vllm exists (scripts/vllm_venv.sh); else the section says so."""
    from trainer.testing.vllm_server import vllm_python

    return "| quickstart (4x4, 1 tok) | vllm |" if vllm_python() else "**Not measured: no vLLM environment"


SECTIONS = {
    "grpo": ("## GRPO step throughput: userloop vs TRL vs the floor", "| full | floor |"),
    "logprobs": ("## GRPO update at Qwen3's vocabulary: loss head time and memory", "| plain |"),
    "api": (
        "## API client throughput",
        "| the run's client: `ProcessApiClient` on this process's `LoopThread`",
    ),
    "checkpoint": (
        "## Checkpoint I/O",
        "| **step blocked by a background save** (`BackgroundSaver.start`) |",
    ),
    "launcher": ("## Launcher cold start", "| `launcher --help` |"),
    "overlap": ("## Multi-turn overlap", "| L (s) |"),
    "vllm": ("## Rollout engines: GRPO step with hf vs vLLM", _vllm_row()),
    "gpu": ("## GPU (H200 class)", "MFU"),
}


def test_every_benchmark_runs_quick_and_writes_its_table(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    groups = {
        "a": ["grpo", "checkpoint", "gpu"],
        "b": ["api", "overlap", "launcher", "logprobs", "vllm"],
    }  # ~equal halves
    procs = {}
    for group, names in groups.items():
        docs = tmp_path / f"{group}.md"
        docs.write_text("# Benchmarks\n\n## Hand-written notes\n\nkept\n")
        only = [arg for name in names for arg in ("--only", name)]
        cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--write", "--docs", str(docs),
               "--json", str(tmp_path / f"{group}.json"), *only]  # fmt: skip
        procs[group] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for group, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (group, err[-4000:])
    for group, names in groups.items():
        text = (tmp_path / f"{group}.md").read_text()
        assert "## Hand-written notes\n\nkept" in text  # other sections are left alone
        for name in names:
            heading, row = SECTIONS[name]
            assert text.count(heading) == 1, name
            section = text.split(heading, 1)[1].split("\n## ", 1)[0]
            assert row in section, (name, section[:2000])
        assert set(json.loads((tmp_path / f"{group}.json").read_text())) == set(names)
