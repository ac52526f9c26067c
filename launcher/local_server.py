"""``rollout.<engine>.launch: true``: ``launcher run`` starts the rollout server as a child, like the pod's sidecar.

``LocalServer`` is what the SGLang and vLLM launches share (``launcher.local_sglang``, ``launcher.local_vllm``
name the command, the readiness route and what to check first). The child gets the sidecar's flags
(``launcher.values``: model, LoRA reservation, seed, extra args), except that it listens on 127.0.0.1 (a
workstation, not a pod probed by the kubelet) and on the port of ``rollout.<engine>.url`` when that is set.
The launcher polls the readiness route (every 2 s, up to ``rollout.<engine>.startup_timeout_s``), points the
trainer at it (``USERLOOP_<ENGINE>_URL``), and stops it when the trainer ends, fails or is interrupted. The
server runs in its own process group, stopped here after the trainer with everything it spawned (SIGTERM,
then SIGKILL to the whole group).

GPUs: like the pod, where the sidecar and the trainer get disjoint GPUs, the server gets the last
``cluster.rollout_gpus_per_node`` visible GPUs (1 when unset) and the trainer the rest, through
``CUDA_VISIBLE_DEVICES``; too few GPUs is an error before anything starts. Without visible GPUs (a CPU
machine, a test double) nothing is split.

Torch-free (the launcher never imports torch): readiness is polled with urllib, GPUs are counted from
``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

from trainer.config import RunConfig
from trainer.errors import UserError

POLL_S = 2.0


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
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


class LocalServer(ABC):
    """The rollout server of one local run: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    ``server_gpus``/``trainer_gpus``: the ``CUDA_VISIBLE_DEVICES`` split (None without visible GPUs).
    Subclasses set the class attributes, ``args`` (the sidecar's flags) and ``command()``."""

    NAME: ClassVar[str]  # "SGLang": in messages
    ENGINE: ClassVar[str]  # "sglang": rollout.<engine> and cluster.<engine>
    HEALTH: ClassVar[str]  # the readiness route
    URL_ENV: ClassVar[str]  # the variable that points the trainer at it
    PORT_FLAG: ClassVar[str]
    TP_FLAG: ClassVar[str]
    HINT: ClassVar[str]  # what to check when it dies while starting

    def __init__(self, cfg: RunConfig, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        section = getattr(cfg.rollout, self.ENGINE)
        # The config requires an explicit port in url with launch: true (the server listens where it is polled).
        port = urlparse(section.url).port if section.url else None
        self.port = port or getattr(cfg.cluster, self.ENGINE).port
        self.url = section.url.rstrip("/") if section.url else f"http://127.0.0.1:{self.port}"
        # The chart runs a sidecar only with rollout GPUs; locally the server always has at least one.
        n_server = max(1, cfg.cluster.rollout_gpus_per_node)
        gpus = visible_gpus(env)
        self.server_gpus: list[str] | None = None
        self.trainer_gpus: list[str] | None = None
        if gpus:
            if len(gpus) <= n_server:
                raise UserError(
                    "cluster.rollout_gpus_per_node",
                    f"rollout.{self.ENGINE}.launch gives the {self.NAME} server {n_server} GPU(s) and the trainer "
                    f"the rest, but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})",
                    hint="lower cluster.rollout_gpus_per_node, make more GPUs visible (CUDA_VISIBLE_DEVICES), "
                    f"or run the server elsewhere and set rollout.{self.ENGINE}.launch: false with "
                    f"rollout.{self.ENGINE}.url",
                )
            self.server_gpus, self.trainer_gpus = gpus[-n_server:], gpus[:-n_server]
        args = set_flag(args, "--host", "127.0.0.1")
        args = set_flag(args, self.PORT_FLAG, str(self.port))
        self.args = set_flag(args, self.TP_FLAG, str(n_server))
        self.startup_timeout_s = section.startup_timeout_s
        self.log_path = log_path
        self.extra_env: dict[str, str] = {}  # more variables for the server (tests: CPU KV-cache size)
        self._proc: subprocess.Popen | None = None

    def trainer_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for the trainer: the GPUs the server does not use."""
        if self.trainer_gpus is None:
            return dict(env)
        return dict(env, CUDA_VISIBLE_DEVICES=",".join(self.trainer_gpus))

    @abstractmethod
    def command(self) -> list[str]: ...

    def server_env(self) -> dict[str, str]:
        """Variables the server needs besides the launcher's environment."""
        return {}

    @abstractmethod
    def check_installed(self) -> None:
        """Raise a ``UserError`` when the server cannot be started at all (its package is missing)."""

    def start(self) -> LocalServer:
        self.check_installed()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.server_env(), **self.extra_env)
        if self.server_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.server_gpus)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)  # fmt: skip
        return self

    def wait_ready(self) -> None:
        assert self._proc is not None
        where = f"rollout.{self.ENGINE}.launch"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise UserError(where, f"the {self.NAME} server exited with code {code} while starting; its log "
                                f"({self.log_path}) ends with:\n{self.log_tail()}", hint=self.HINT)  # fmt: skip
            try:
                with urllib.request.urlopen(self.url + self.HEALTH, timeout=10) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() + POLL_S > deadline:
                raise UserError(where, f"the {self.NAME} server at {self.url} was not ready within "
                                f"rollout.{self.ENGINE}.startup_timeout_s={self.startup_timeout_s:g}s; its log "
                                f"({self.log_path}) ends with:\n{self.log_tail()}",
                                hint="raise startup_timeout_s for large models")  # fmt: skip
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

    def __enter__(self) -> LocalServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_server(cfg: RunConfig, log_path: Path, env: dict[str, str] | None = None) -> LocalServer | None:
    """The server ``launcher run``/``eval`` starts for ``cfg`` (``rollout.<engine>.launch``), or None."""
    server = cfg.rollout.server()
    if server is None or not server.launch:
        return None
    if cfg.rollout.engine == "vllm":
        from launcher.local_vllm import LocalVLLM

        return LocalVLLM(cfg, log_path, env)
    from launcher.local_sglang import LocalSGLang

    return LocalSGLang(cfg, log_path, env)
