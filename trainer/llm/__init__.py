"""LLM clients for the user simulator and the judges: an OpenAI-compatible API (litellm) or a local HF model.

Pieces, smallest first:

- ``types``: ``CallResult`` (what every call returns: ok/text/value/error/kind/latency/tokens/cost/
  retries), the ``LLMClient`` protocol, ``redact``.
- ``loop.LoopThread``: the run's one long-lived event loop in its own thread; ``submit(coro)``
  returns a ``concurrent.futures.Future``.
- ``limits``: token buckets (rpm/tpm) and backoff with jitter.
- ``stats.ApiStats``: counters per backend (``api/calls``, ``api/failed``, ``api/retries``,
  ``api/cost``, latency p50/p95), ``budget_exceeded``; ``merge_snapshots`` for the metrics line.
- ``cache.ResponseCache``: SQLite cache of temperature-0 calls under ``output_dir``.
- ``api.ApiClient`` (the only importer of litellm) and ``local.LocalClient`` (in-process HF model,
  micro-batched in a worker thread).
- ``process.ProcessApiClient``: what ``make_client`` returns for ``backend: api``; runs ``ApiClient`` in
  one worker process per trainer process (``worker``, frames in ``wire``) so that litellm's Python does
  not hold the training loop's GIL.
- ``probe.check_endpoints``: each endpoint answers and takes its key before the first step, or a
  ``UserError`` says which role, URL and cause.

Integration sketch (the trainer owns one loop and one client per role)::

    loop = LoopThread()
    cache = open_cache(cfg.output_dir)
    user = make_client(cfg.user_simulator, "user_simulator", cache)
    judge = make_client(cfg.judge, "judge", cache)
    loop.run(check_endpoints([user, judge]))            # a dead api_base or a bad key fails here
    result = loop.run(user.complete(messages))          # or submit() many episode coroutines
    metrics.update(merge_snapshots([user.stats, judge.stats], reset_window=True))
    if user.stats.budget_exceeded: save checkpoint and stop

Importing this package imports neither litellm nor torch; ``make_client`` imports the one it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.llm.cache import CACHE_FILE, ResponseCache
from trainer.llm.loop import LoopThread
from trainer.llm.probe import check_endpoints
from trainer.llm.stats import ApiStats, merge_snapshots
from trainer.llm.types import CallResult, LLMClient, Message, redact

if TYPE_CHECKING:
    from trainer.config.multiturn import ApiBackendConfig

__all__ = [
    "ApiStats",
    "CallResult",
    "LLMClient",
    "LoopThread",
    "Message",
    "ResponseCache",
    "check_endpoints",
    "make_client",
    "merge_snapshots",
    "open_cache",
    "redact",
]


def open_cache(output_dir: str | Path) -> ResponseCache:
    """The run's response cache, ``<output_dir>/api_cache.sqlite``."""
    return ResponseCache(Path(output_dir) / CACHE_FILE)


def make_client(
    cfg: ApiBackendConfig,
    role: str,
    cache: ResponseCache | None = None,
    seed: int | None = None,
    in_process: bool = False,
) -> LLMClient:
    """A client for one config section; ``role`` names it in metrics and errors.

    ``backend: api``: a ``ProcessApiClient`` (litellm in the API worker process), or with ``in_process`` an
    ``ApiClient`` on the caller's event loop (tests and benchmarks compare the two). ``backend: local``:
    a ``LocalClient``.
    """
    if cfg.backend == "local":
        from trainer.llm.local import LocalClient

        return LocalClient(cfg, role)
    if in_process:
        from trainer.llm.api import ApiClient

        return ApiClient(cfg, role, cache=cache, seed=seed)
    from trainer.llm.process import ProcessApiClient

    return ProcessApiClient(cfg, role, cache=cache, seed=seed)
