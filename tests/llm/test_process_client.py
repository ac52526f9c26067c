"""What only the process client has: its worker process dies with the trainer, stops with the last client,
turns its own death into invalid results, and never receives a key over the pipe."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.config.multiturn import ApiBackendConfig
from trainer.llm import LoopThread, make_client
from trainer.llm import process as process_module
from trainer.llm.process import ProcessApiClient
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.serve import TransformersServer

REPO = Path(__file__).resolve().parents[2]
HI = [{"role": "user", "content": "hi"}]


def _cfg(server: TransformersServer, base: str, key_env: str | None = None) -> ApiBackendConfig:
    return ApiBackendConfig(model=server.model, api_base=base, api_key_env=key_env, timeout_s=2.0, retries=1,
                            backoff_s=0.02, max_tokens=4, temperature=0.7)  # fmt: skip


def _gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_the_worker_dies_with_a_killed_trainer(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from trainer.config.multiturn import ApiBackendConfig\n"
        "from trainer.llm import make_client\n"
        "c = make_client(ApiBackendConfig(model='m', api_base='http://127.0.0.1:9/v1'), 'judge')\n"
        "print(c.worker_pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert trainer.stdout is not None
        worker = int(trainer.stdout.readline())
        assert not _gone(worker, timeout=1.0)  # it runs while the trainer does
        trainer.send_signal(signal.SIGKILL)  # no cleanup code runs: only the pipe's end of file tells it
        trainer.wait(10)
        assert _gone(worker, timeout=10.0), f"API worker {worker} outlived its killed trainer"
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stdout and trainer.stdout.close()


def test_the_last_client_to_close_stops_the_worker(
    server: TransformersServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key variable no earlier test set: a worker of its own (other tests' clients hold the shared one).
    monkeypatch.setenv("USERLOOP_LAST_CLIENT_KEY", "k" * 8)
    with LoopThread() as loop:
        user = make_client(_cfg(server, proxy.url + "/v1", "USERLOOP_LAST_CLIENT_KEY"), "user_simulator")
        judge = make_client(_cfg(server, proxy.url + "/v1", "USERLOOP_LAST_CLIENT_KEY"), "judge")
        assert isinstance(user, ProcessApiClient) and isinstance(judge, ProcessApiClient)
        assert user.worker_pid == judge.worker_pid  # one worker per trainer process
        pid, worker = user.worker_pid, user._worker
        assert pid is not None and worker is not None and loop.run(user.complete(HI)).ok
        loop.run(user.aclose())
        assert not _gone(pid, timeout=0.5) and loop.run(judge.complete(HI)).ok
        loop.run(judge.aclose())
        assert _gone(pid, timeout=10.0)
        assert not worker._reader.is_alive()  # the reply reader thread is joined too


def test_a_dead_worker_makes_invalid_results_not_exceptions(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERLOOP_DEAD_WORKER_KEY", "k" * 8)  # a worker of its own, not the shared one
    client = make_client(_cfg(server, proxy.url + "/v1", "USERLOOP_DEAD_WORKER_KEY"), "judge")
    assert isinstance(client, ProcessApiClient) and client.worker_pid is not None
    os.kill(client.worker_pid, signal.SIGKILL)
    assert _gone(client.worker_pid, timeout=5.0)
    res = loop.run(client.complete(HI), timeout=30)
    assert not res.ok and res.kind == "other" and "API worker" in (res.error or "")
    assert client.stats.snapshot()["api/failed"] == 1
    loop.run(client.aclose())


def test_the_key_never_crosses_the_pipe(
    server: TransformersServer,
    proxy: FaultProxy,
    loop: LoopThread,
    marker_key: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The marker key under a variable no earlier test set: a new worker, whose reply reader starts spied on.
    key = marker_key[1]
    key_env = "USERLOOP_PIPE_TEST_KEY"
    monkeypatch.setenv(key_env, key)
    frames: list[bytes] = []
    real_send, real_read = process_module.FrameWriter.send, process_module.read_frame

    def send(self, message):  # type: ignore[no-untyped-def]
        frames.append(pickle.dumps(message))
        real_send(self, message)

    def read(fd):  # type: ignore[no-untyped-def]
        message = real_read(fd)
        frames.append(pickle.dumps(message))
        return message

    monkeypatch.setattr(process_module.FrameWriter, "send", send)
    monkeypatch.setattr(process_module, "read_frame", read)
    client = make_client(_cfg(server, proxy.url + "/v1", key_env), "judge")
    ok = loop.run(client.complete(HI))
    proxy.script("server_error", "drop")
    failed = loop.run(client.complete([{"role": "user", "content": "fail"}]))
    assert ok.ok and not failed.ok
    assert proxy.stats()["with_authorization"] == 3  # the worker sent the key to the server ...
    # ... and it never crossed the pipe, either way.
    assert len(frames) >= 5 and all(key.encode() not in f for f in frames)
    assert key_env.encode() in frames[0]  # the config names the variable, nothing more
    loop.run(client.aclose())
