"""One run per output_dir (``trainer.run_lock``): a second run exits 2 naming the first; a crashed run's lock file is
taken over; the first run is not disturbed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import run_lock
from trainer.config import load_config
from trainer.errors import UserError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid until the kernel reuses it


def test_a_held_output_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = run_lock.acquire(out, "launcher run configs/x.yaml")
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, since "
    for attempt in (lambda: run_lock.acquire(out), lambda: run_lock.check_free(out)):
        with pytest.raises(UserError) as e:
            attempt()
        assert e.value.source == f"output_dir {out}"
        assert e.value.problems[0].startswith(f"another run is writing into it: {holder}")
        assert e.value.problems[0].endswith(": launcher run configs/x.yaml")
        assert e.value.hint is not None and e.value.hint.startswith(
            f"wait for it to finish, stop it (Ctrl-C in its terminal, or kill -INT {os.getpid()} on "
        )
    lock.release()
    assert (out / ".lock").read_text() == ""  # released: emptied, never deleted
    run_lock.check_free(out)
    run_lock.acquire(out).release()


def test_check_free_writes_nothing(tmp_path: Path) -> None:
    run_lock.check_free(tmp_path / "never-run")
    assert not (tmp_path / "never-run").exists()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(make_config) -> None:
    path = make_config("stale", algorithm__max_steps=1, eval={}, logging={"every_steps": 1, "plots": False})
    cfg = load_config(path)
    Path(cfg.output_dir).mkdir(parents=True)
    pid = _dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "started": 1.7e9, "command": "launcher run old.yaml"}
    (Path(cfg.output_dir) / ".lock").write_text(json.dumps(stale) + "\n")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    took = (
        f"taking over {Path(cfg.output_dir) / '.lock'} from a run that ended without releasing it (pid {pid} "
    )
    assert any(line.startswith(took) for line in proc.stdout.splitlines()), proc.stdout[-2000:]
    assert (Path(cfg.output_dir) / ".lock").read_text() == ""


def test_a_second_run_into_a_busy_output_dir_exits_2_and_the_first_completes(make_config) -> None:
    path = make_config("busy", algorithm__max_steps=4, checkpoint__save_every_steps=None, eval={},
                       logging={"every_steps": 1, "plots": False})  # fmt: skip
    cfg = load_config(path)
    first = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert first.stdout is not None
        head = []
        for line in first.stdout:
            head.append(line)
            if line.startswith("step 1/"):
                break
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, for as long as the test needs
        holder = f"pid {first.pid} on host {socket.gethostname()}, since "
        # `launcher run` checks before it starts the trainer; the trainer checks itself (two starts racing).
        for cmd in (["launcher", "run", str(path)], ["trainer", "--config", str(path)]):
            second = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            error, hint = second.stderr.strip().splitlines()[-2:]
            assert error.startswith(
                f"Error: output_dir {cfg.output_dir}: another run is writing into it: {holder}"
            )
            assert error.endswith(f": python -m trainer --config {path}"), error
            assert hint.startswith("Hint: wait for it to finish, stop it"), hint
            assert "Traceback" not in second.stderr
            assert "parameters" not in second.stdout  # refused before its model was loaded
        first.send_signal(signal.SIGCONT)
        rest, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, "".join(head)[-2000:] + rest[-2000:]
    logs = Path(cfg.output_dir) / "logs"
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (logs / "train.log").read_text().count("userloop grpo run 'busy'") == 1  # nobody else wrote
    assert sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir()) == ["step_4"]


def test_an_in_process_main_leaves_no_command_behind(tmp_path, monkeypatch) -> None:
    """``python -m trainer``'s main() also runs in-process (tests, notebooks): the command it records for the lock
    and the resume line must not outlive it, or every later run in that process names the wrong command."""
    from trainer.__main__ import main

    monkeypatch.delenv("USERLOOP_COMMAND", raising=False)
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "USERLOOP_COMMAND" not in os.environ
