"""``python -m trainer`` ends a successful run with ``os._exit`` (no interpreter teardown) after joining the
background checkpoint writer: everything the run wrote must be complete and flushed by then."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainer import checkpoint
from trainer.config import load_config


def test_a_finished_run_exits_with_every_file_complete(make_config) -> None:
    # A save every step: the last periodic save is still writing in the background when the loop ends.
    path = make_config("exit", algorithm__max_steps=3, checkpoint__save_every_steps=1, checkpoint__keep_last=5,
                       eval={}, logging={"every_steps": 1, "plots": False})  # fmt: skip
    cfg = load_config(path)
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("done: 3 steps"), lines[-3:]
    written = [line for line in lines if line.startswith("checkpoint ")]
    assert len(written) == 3 and all("written while training" in line for line in written), written
    root = checkpoint.checkpoints_dir(cfg.output_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2", "step_3"]  # no .tmp-* left
    assert all(checkpoint.verify_manifest(p) is None for _, p in checkpoint.complete_checkpoints(root))
    metrics = (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [1, 2, 3]


def test_a_failed_run_still_reports_and_exits_with_its_code(make_config) -> None:
    path = make_config("exit-bad", algorithm__batch_size=10_000)
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: algorithm.batch_size"), proc.stderr[-2000:]
