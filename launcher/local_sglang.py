"""``rollout.sglang.launch: true``: the SGLang server as ``launcher run``'s child (see ``launcher.local_server``).

The child runs ``python -m sglang.launch_server`` with the sidecar's flags (``launcher.values.sglang_args``),
in the launcher's own interpreter (``pip install userloop[sglang]``), and is ready once ``/health_generate``
answers 200 (a one-token generation works).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from launcher.local_server import LocalServer, visible_gpus
from launcher.values import sglang_args
from trainer.config import RunConfig
from trainer.errors import UserError

__all__ = ["LocalSGLang", "visible_gpus"]


class LocalSGLang(LocalServer):
    NAME = "SGLang"
    ENGINE = "sglang"
    HEALTH = "/health_generate"
    URL_ENV = "USERLOOP_SGLANG_URL"
    PORT_FLAG = "--port"
    TP_FLAG = "--tp-size"
    HINT = "fix what the log says (model path, GPU memory: cluster.sglang.mem_fraction_static)"

    def __init__(self, cfg: RunConfig, log_path: Path, env: dict[str, str] | None = None):
        super().__init__(cfg, sglang_args(cfg), log_path, env)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", *self.args]

    def check_installed(self) -> None:
        if importlib.util.find_spec("sglang") is None:
            raise UserError("rollout.sglang.launch", "is true but the sglang package is not installed",
                            hint="pip install 'userloop[sglang]' on a CUDA machine, or run the server yourself and "
                            "set rollout.sglang.launch: false")  # fmt: skip
