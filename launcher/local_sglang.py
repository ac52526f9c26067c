"""``rollout.sglang.launch: true``: ``launcher run`` starts the SGLang server as a child process, like the pod's sidecar.

The child gets the sidecar's flags (``launcher.values.sglang_args``: model, LoRA reservation, seed, extra
args), except that it listens on 127.0.0.1 (a workstation, not a pod probed by the kubelet) and on the port
of ``rollout.sglang.url`` when that is set. The launcher waits for ``/health_generate`` (every 2 s, up to
``rollout.sglang.startup_timeout_s``), points the trainer at it (``USERLOOP_SGLANG_URL``), and stops it
when the trainer ends, fails or is interrupted. The server runs in its own process group, stopped here
after the trainer with everything it spawned (SIGTERM, then SIGKILL to the whole group).

GPUs: like the pod, where the sidecar and the trainer get disjoint GPUs, the server gets the last
``cluster.rollout_gpus_per_node`` visible GPUs (1 when unset) and the trainer the rest, through
``CUDA_VISIBLE_DEVICES``; too few GPUs is an error before anything starts. Without visible GPUs (a CPU
machine, a test double) nothing is split.

Torch-free (the launcher never imports torch): readiness is polled with urllib, GPUs are counted from
``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from launcher.values import sglang_args
from trainer.config import RunConfig
from trainer.errors import UserError

POLL_S = 2.0


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The GPU ids CUDA would show a child process: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = []
        for item in env["CUDA_VISIBLE_DEVICES"].split(","):
            item = item.strip()
            if not item or item.startswith("-"):  # CUDA stops at the first invalid id ("-1": none)
                break
            ids.append(item)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(x for x in out.stdout.splitlines() if x.startswith("GPU "))]


class LocalSGLang:
    """The SGLang server of one local run: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    ``server_gpus``/``trainer_gpus``: the ``CUDA_VISIBLE_DEVICES`` split (None without visible GPUs)."""

    def __init__(self, cfg: RunConfig, log_path: Path, env: dict[str, str] | None = None):
        sg = cfg.rollout.sglang
        # The config requires an explicit port in url with launch: true (the server listens where it is polled).
        port = urlparse(sg.url).port if sg.url else None
        self.port = port or cfg.cluster.sglang.port
        self.url = sg.url.rstrip("/") if sg.url else f"http://127.0.0.1:{self.port}"
        # The chart runs a sidecar only with rollout GPUs; locally the server always has at least one.
        n_server = max(1, cfg.cluster.rollout_gpus_per_node)
        gpus = visible_gpus(env)
        self.server_gpus: list[str] | None = None
        self.trainer_gpus: list[str] | None = None
        if gpus:
            if len(gpus) <= n_server:
                raise UserError(
                    "cluster.rollout_gpus_per_node",
                    f"rollout.sglang.launch gives the SGLang server {n_server} GPU(s) and the trainer the rest, "
                    f"but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})",
                    hint="lower cluster.rollout_gpus_per_node, make more GPUs visible (CUDA_VISIBLE_DEVICES), "
                    "or run the server elsewhere and set rollout.sglang.launch: false with rollout.sglang.url",
                )
            self.server_gpus, self.trainer_gpus = gpus[-n_server:], gpus[:-n_server]
        args = _set_flag(sglang_args(cfg), "--host", "127.0.0.1")
        args = _set_flag(args, "--port", str(self.port))
        self.args = _set_flag(args, "--tp-size", str(n_server))
        self.startup_timeout_s = sg.startup_timeout_s
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def trainer_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for the trainer: the GPUs the server does not use."""
        if self.trainer_gpus is None:
            return dict(env)
        return dict(env, CUDA_VISIBLE_DEVICES=",".join(self.trainer_gpus))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", *self.args]

    def start(self) -> LocalSGLang:
        if importlib.util.find_spec("sglang") is None:
            raise UserError("rollout.sglang.launch", "is true but the sglang package is not installed",
                            hint="pip install 'userloop[sglang]' on a CUDA machine, or run the server yourself and "
                            "set rollout.sglang.launch: false")  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.server_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.server_gpus)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)  # fmt: skip
        return self

    def wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise UserError("rollout.sglang.launch", f"the SGLang server exited with code {code} while starting; "
                                f"its log ({self.log_path}) ends with:\n{self.log_tail()}",
                                hint="fix what the log says (model path, GPU memory: cluster.sglang.mem_fraction_static)")  # fmt: skip
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=10) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() + POLL_S > deadline:
                raise UserError("rollout.sglang.launch", f"the SGLang server at {self.url} was not ready within "
                                f"rollout.sglang.startup_timeout_s={self.startup_timeout_s:g}s; its log ({self.log_path}) "
                                f"ends with:\n{self.log_tail()}", hint="raise startup_timeout_s for large models")  # fmt: skip
            time.sleep(POLL_S)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, then (after it exits or ``grace_s``) SIGKILL to the group:
        whatever the server spawned goes too, even when the server itself had already exited."""
        if self._proc is None:
            return
        pid = self._proc.pid  # the group's id: it outlives its leader while members remain
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=wait_s)

    def __enter__(self) -> LocalSGLang:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
