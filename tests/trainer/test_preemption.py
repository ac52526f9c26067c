"""SIGTERM (what kubelet sends on eviction): finish the step, checkpoint, exit 143 so the job retries and resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config


def test_sigterm_checkpoints_and_exits_retryable(make_config) -> None:
    path = make_config("preempt", algorithm__max_steps=5000, checkpoint__save_every_steps=None)
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines += rest.splitlines(keepends=True)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines)[-2000:]
    cfg = load_config(path)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, last + 1))
    ckpt = Path(cfg.output_dir) / "checkpoints" / f"step_{last}"
    assert (ckpt / "manifest.json").is_file(), "".join(lines)[-2000:]
    assert any(x.startswith("SIGTERM ") and "exiting with 143" in x for x in lines), "".join(lines)[-2000:]

    done = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--set",
                           f"algorithm.max_steps={last + 2}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {ckpt} at step {last}" in done.stdout
    # Preempted (mid-step or between steps) and resumed == uninterrupted: the abandoned step is redone exactly.
    from trainer import api

    straight = load_config(
        make_config("straight", algorithm__max_steps=last + 2, checkpoint__save_every_steps=None)
    )
    api.train(straight)
    resumed = [
        json.loads(x) for x in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    expected = [
        json.loads(x) for x in (Path(straight.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in resumed] == list(range(1, last + 3))
    for key in ("reward/mean", "loss/policy", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in expected], abs=1e-6), key
