"""A vLLM worker extension for the tests: a weight reload that holds the engine for as long as asked.

Loaded into the real server with ``--worker-extension-cls trainer.testing.vllm_worker.SlowReload`` (vLLM
mixes the class into its worker; ``POST /collective_rpc {"method": "slow_reload_weights", "kwargs":
{"weights_path": DIR, "delay_s": "8"}}`` calls it). The engine process is blocked in it for ``delay_s``
seconds, as it would be reloading a large model from a slow disk: what the liveness-probe test needs. No
imports beyond the standard library: it runs inside vLLM's environment.
"""

from __future__ import annotations

import time


class SlowReload:
    def slow_reload_weights(self, weights_path: str, delay_s: str = "5") -> None:
        """``reload_weights`` after ``delay_s`` seconds of the engine doing nothing else (kwargs are strings:
        /collective_rpc passes only strings)."""
        time.sleep(float(delay_s))
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]  (the worker's method)
