"""``launcher run --nproc N`` runs torchrun through ``trainer.torchrun``: the trainer's exit code, not torchrun's 1
and traceback (the Ctrl-C case, 130, is in test_interrupt.py)."""

from __future__ import annotations

import subprocess
import sys


def test_a_bad_input_under_torchrun_exits_2_without_a_traceback(make_config) -> None:
    path = make_config("ddp-bad", algorithm__batch_size=10_000)
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Error: algorithm.batch_size: 10000 is larger than the training set" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "ChildFailedError" not in proc.stderr
