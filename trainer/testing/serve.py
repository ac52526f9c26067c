"""Start ``transformers serve`` on a local model directory: a real OpenAI-compatible server for tests.

Facts this relies on (transformers 5.x, extra ``transformers[serving]``: fastapi + uvicorn):

- ``transformers serve <model_dir> --host 127.0.0.1 --port <p> --device cpu`` preloads the model
  (the positional ``FORCE_MODEL``) before uvicorn starts, so ``GET /health`` answering 200 means the
  model is loaded. With ``HF_HUB_OFFLINE=1`` a local directory loads without any network access.
- The server is *pinned* to that model: requests must name it exactly (``model = <model_dir>``, as
  given on the command line) or get a 400 "Server is pinned to ...". Through litellm the model is
  therefore ``openai/<model_dir>``.
- Unknown request fields are rejected with 400 ("Unexpected fields in the request"), so
  ``extra_body`` such as DashScope's ``enable_thinking`` cannot be sent to it.
- ``GET /v1/models`` scans the hub cache and fails with 500 when there is none (5.23; 5.24 lists the pinned
  model); use ``/health``.
- Start-up on 2 CPU cores with a tiny model takes ~7 s (mostly importing torch/transformers);
  a chat completion of a few tokens then takes well under a second.

Usage::

    with TransformersServer(model_dir) as server:
        server.base_url   # "http://127.0.0.1:<port>/v1"
        server.model      # the name requests must use
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from trainer.testing.server_process import ServerProcess


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it right after; a race is unlikely here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TransformersServer(ServerProcess):
    """``transformers serve`` on ``model_dir`` in a subprocess, bound to 127.0.0.1 on a free port."""

    def __init__(
        self, model_dir: str | Path, startup_timeout_s: float = 120.0, log_path: str | Path | None = None
    ):
        self.model_dir = str(Path(model_dir).resolve())
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="tserve-")) / "server.log"
        )
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (``api_base``)."""
        return self.root_url + "/v1"

    @property
    def model(self) -> str:
        """The model name requests must carry (the server is pinned to it)."""
        return self.model_dir

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            self.model_dir,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]

    def start(self) -> TransformersServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        t0 = time.monotonic()
        # A session of its own so stop() can signal the server and anything it spawned, and only those.
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        try:
            self._wait_healthy(t0)
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        assert self._proc is not None
        while time.monotonic() - t0 < self.startup_timeout_s:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"transformers serve exited with code {self._proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.root_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"transformers serve not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def _warm_up(self) -> None:
        body = json.dumps(
            {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).encode()
        req = urllib.request.Request(
            self.base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            json.loads(r.read())
