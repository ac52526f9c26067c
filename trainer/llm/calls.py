"""The front every API client shares: the cache of deterministic calls, call counting, failure bookkeeping.

Subclasses (``ApiClient`` in-process, ``ProcessApiClient`` over the API worker) provide the attempts.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from trainer.llm.cache import ResponseCache, cache_key
from trainer.llm.stats import ApiStats
from trainer.llm.types import DEFAULT_API_BASE, CallResult, Message, Parser


class CachedCalls(ABC):
    cfg: Any  # ApiBackendConfig
    model: str
    endpoint: str
    cache: ResponseCache | None
    stats: ApiStats

    def __init__(self, cfg: Any, role: str, cache: ResponseCache | None, seed: int | None) -> None:
        if cfg.backend != "api" or not cfg.model:
            raise ValueError(f"{type(self).__name__} needs backend: api and a model")
        self.cfg = cfg
        self.role = role
        self.model = f"openai/{cfg.model}"
        self.endpoint = f"{role} ({self.model} at {cfg.api_base or DEFAULT_API_BASE})"
        self.stats = ApiStats(role, self.endpoint, cfg.budget)
        self.cache = cache if cfg.cache else None
        self._rng = random.Random(seed)  # backoff jitter

    @abstractmethod
    async def _attempts(
        self, messages: Sequence[Message], temperature: float, max_tokens: int, parse: Parser | None
    ) -> CallResult:
        """Attempts until a reply is accepted or the retries are spent (in-process, or through the API worker)."""

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        parse: Parser | None = None,
    ) -> CallResult:
        t0 = time.monotonic()
        temperature = self.cfg.temperature if temperature is None else temperature
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        params = {"temperature": temperature, "max_tokens": max_tokens, "extra_body": self.cfg.extra_body}
        key = None
        if self.cache is not None and temperature == 0:
            key = cache_key(self.cfg.api_base or "", self.model, messages, params)
            hit = self._from_cache(key, parse, t0)
            if hit is not None:
                return hit
        self.stats.add("calls")
        result = await self._attempts(messages, temperature, max_tokens, parse)
        result.latency_s = time.monotonic() - t0
        if result.ok:
            if key is not None and self.cache is not None:
                self.cache.put(key, result.text, result.prompt_tokens, result.completion_tokens)
        else:
            self.stats.add("failed")
            self.stats.add_error(result.kind or "other", result.error or "")
        return result

    def _from_cache(self, key: str, parse: Parser | None, t0: float) -> CallResult | None:
        assert self.cache is not None
        hit = self.cache.get(key)
        if hit is None:
            return None
        text, pt, ct = hit
        try:
            value = parse(text) if parse else text
        except Exception:
            return None  # stored under another parser; ask again
        self.stats.add("cache_hits")
        return CallResult(
            ok=True, text=text, value=value, prompt_tokens=pt, completion_tokens=ct, cached=True,
            endpoint=self.endpoint, latency_s=time.monotonic() - t0,
        )  # fmt: skip
