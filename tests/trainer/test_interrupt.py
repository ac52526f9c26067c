"""Ctrl-C (SIGINT) in a terminal: the first one finishes or abandons the step, checkpoints, says where and how to
resume, and exits 130; a second one stops at once. Through ``launcher run --nproc 2`` (torchrun) as well."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.config import load_config


def _interrupt(cmd: list[str], *plan: tuple[str, int]) -> tuple[int, str, float]:
    """Run ``python -m <cmd>``; for each ``(prefix, signal)`` of ``plan`` in turn, send the signal once a line
    starts with the prefix. (exit code, all output, seconds from the last signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines, todo, sent = [], list(plan), time.monotonic()
    try:
        assert proc.stdout is not None
        while todo:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(todo[0][0]):
                proc.send_signal(todo.pop(0)[1])
                sent = time.monotonic()
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert not todo, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines) + rest, time.monotonic() - sent


def _metric_steps(output_dir: str) -> list[int]:
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def _check_graceful(code: int, out: str, output_dir: str, resume: str) -> Path:
    """Exit 130, the handler's line at once, one checkpoint of the last finished step, where and how to resume."""
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = out.splitlines()
    said = [x for x in lines if x.startswith(("interrupted: ", "interrupted during "))]
    assert len(said) == 1 and said[0].endswith("; press Ctrl-C again to stop at once"), out[-3000:]
    steps = _metric_steps(output_dir)
    last = steps[-1]
    assert steps == list(range(1, last + 1))
    ckpt = Path(output_dir) / "checkpoints" / f"step_{last}"
    assert (ckpt / "manifest.json").is_file(), out[-3000:]
    assert sum(x.startswith(f"checkpoint {ckpt}") for x in lines) == 1, out[-3000:]
    where = f"checkpoint {ckpt}; to resume from it, run the same command again: {resume}"
    ended = [x for x in lines if x.startswith(f"interrupted at step {last}/") and x.endswith(where)]
    assert len(ended) == 1, out[-3000:]
    # What the handler announced is what happened (one process knows whether the update has started).
    if not said[0].startswith("interrupted during "):
        assert said[0].startswith(
            (f"interrupted: abandoning step {last + 1}/", f"interrupted: finishing step {last}/")
        )
        assert "abandoning" not in said[0] or f"checkpointing step {last};" in said[0], out[-3000:]
    return ckpt


def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(make_config) -> None:
    path = make_config("sigint", algorithm__max_steps=5000, checkpoint__save_every_steps=None)
    cfg = load_config(path)
    code, out, _ = _interrupt(["trainer", "--config", str(path)], ("step 2/", signal.SIGINT))
    ckpt = _check_graceful(code, out, cfg.output_dir, f"python -m trainer --config {path}")
    # The resolved config (~160 lines) is in train.log, not among the step lines; one line says where it is.
    assert "resolved config:" not in out and "\nalgorithm:" not in out, out[:3000]
    assert f"resolved config in {Path(cfg.output_dir) / 'config.yaml'}" in out
    assert "resolved config:\nname: sigint" in (Path(cfg.output_dir) / "logs" / "train.log").read_text()

    last = int(ckpt.name.split("_")[1])
    again = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--set",
                            f"algorithm.max_steps={last + 1}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {ckpt} at step {last}" in again.stdout
    assert _metric_steps(cfg.output_dir) == list(range(1, last + 2))


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_stop_signal_after_ctrl_c_stops_at_once(make_config, second: int) -> None:
    """Ctrl-C twice; or Ctrl-C then SIGTERM, which is what bare torchrun sends its workers on a second Ctrl-C."""
    # Long completions: the rollouts of step 2 take a while, so the second signal comes while the first one
    # still waits for them (it would abandon the step, then checkpoint step 1).
    path = make_config("sigint2", algorithm__max_steps=5000, checkpoint__save_every_steps=None,
                       rollout__max_new_tokens=96)  # fmt: skip
    cfg = load_config(path)
    code, out, took = _interrupt(["trainer", "--config", str(path)], ("step 1/", signal.SIGINT),
                                 ("interrupted: abandoning step 2/", second))  # fmt: skip
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    why = "second Ctrl-C" if second == signal.SIGINT else "SIGTERM after Ctrl-C"
    assert f"{why}: stopping at once, without a checkpoint (earlier ones are complete)" in out.splitlines(), (
        out
    )
    assert not (Path(cfg.output_dir) / "checkpoints").exists() or not any(
        (Path(cfg.output_dir) / "checkpoints").glob("step_*/manifest.json")
    )
    assert took < 20, took  # the interpreter's exit, not a step and a save


def test_ctrl_c_through_launcher_run_with_torchrun(make_config) -> None:
    """The terminal's Ctrl-C reaches ``launcher run`` (the trainer has a session of its own); torchrun passes it
    to each worker once: both ranks stop together, rank 0 checkpoints, and the launcher exits 130 without
    torchrun's traceback."""
    path = make_config("sigint-ddp", algorithm__max_steps=5000, checkpoint__save_every_steps=None)
    cfg = load_config(path)
    code, out, _ = _interrupt(["launcher", "run", str(path), "--nproc", "2"], ("step 2/", signal.SIGINT))
    _check_graceful(code, out, cfg.output_dir, f"launcher run {path} --nproc 2")
    assert "SignalException" not in out and "ChildFailedError" not in out, out[-3000:]
