"""``ApiClient``: calls to any OpenAI-compatible endpoint through litellm, queued, rate-limited, retried.

This is the only module of userloop that imports litellm (import costs seconds and ~165 MB; the
launcher never reaches it). One call::

    result = await client.complete(messages, parse=parse_verdict)   # never raises for API trouble
    if not result.ok: episode.invalid = result.error                 # never a zero reward

What ``complete`` does, in order:

1. Temperature 0 and ``cache`` on: answer from the SQLite cache when the same call was made before.
2. Wait for the rpm/tpm buckets, then for one of ``max_concurrency`` slots (a queue, never a
   rejection: litellm's Router rejects with 429 instead, CONTEXT §6). A slot is held only while a
   request is in flight, not during backoff.
3. ``litellm.acompletion(model="openai/<model>", api_base, api_key, timeout, max_retries=0,
   extra_body)``: litellm's and the OpenAI client's own retries are off so that every attempt is
   counted and the backoff is ours.
4. Classify a failure by exception type and status code (a refused connection surfaces as
   ``InternalServerError``, so the message is inspected too), retry the retryable kinds with
   exponential backoff and jitter, at least ``Retry-After``; a reply the caller's parser rejects
   is retried only when sampling (temperature > 0), since a greedy call would say the same again.
5. Count tokens, cost, latency and failures in ``stats``; errors are redacted (no key ever leaves).

A run does not use this class in its own process: ``trainer.llm.process.ProcessApiClient`` runs it in a
child process (``trainer.llm.worker``) so that litellm's Python work does not take the training loop's GIL
(issue 6); the cache, the caller's parser and the counters stay on the trainer's side.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402  (the environment variable must be set first)

from trainer.config.multiturn import ApiBackendConfig  # noqa: E402
from trainer.llm.cache import ResponseCache  # noqa: E402
from trainer.llm.calls import CachedCalls  # noqa: E402
from trainer.llm.limits import TokenBucket, backoff_delay, parse_retry_after  # noqa: E402
from trainer.llm.stats import ApiStats  # noqa: E402
from trainer.llm.types import (  # noqa: E402
    RETRYABLE,
    CallResult,
    ErrorKind,
    Message,
    Parser,
    read_api_key,
    redact,
)

litellm.suppress_debug_info = True  # its "Give Feedback" banner goes to stdout on every error

# Message fragments litellm leaves in an InternalServerError when no HTTP reply was parsed.
_CONNECTION_HINTS = (
    "connection error",
    "connection refused",
    "connecterror",
    "remoteprotocolerror",
    "disconnected",
)
# "litellm.RateLimitError: RateLimitError: OpenAIException - msg" -> "msg" (the kind is already named).
_LITELLM_PREFIX = re.compile(r"^litellm\.\w+:\s*(\w+:\s*)?(OpenAIException\s*-\s*)?")
_MALFORMED_HINTS = ("expecting", "jsondecode", "unterminated", "invalid json", "extra data", "delimiter")


def classify(exc: BaseException) -> tuple[ErrorKind, int | None, float | None]:
    """``(kind, status, retry_after_s)`` of a failed attempt."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    retry_after = _retry_after(exc)
    msg = str(exc).lower()
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, litellm.Timeout)) or status == 408:
        return "timeout", status, retry_after
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return "rate_limit", status, retry_after
    if isinstance(exc, litellm.APIConnectionError):
        return "connection", status, retry_after
    if (
        isinstance(exc, (litellm.InternalServerError, litellm.ServiceUnavailableError))
        or (status or 0) >= 500
    ):
        if any(h in msg for h in _CONNECTION_HINTS):
            return "connection", status, retry_after
        if any(h in msg for h in _MALFORMED_HINTS):
            return "malformed", status, retry_after
        return "server", status, retry_after
    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)) or status in (
        401,
        402,
        403,
    ):
        return "auth", status, retry_after
    if isinstance(exc, litellm.NotFoundError) or status == 404:
        return "not_found", status, retry_after
    if isinstance(exc, litellm.BadRequestError) or status in (400, 413, 422):
        return "bad_request", status, retry_after
    if isinstance(exc, (json.JSONDecodeError, KeyError, IndexError)):
        return "malformed", status, retry_after
    return "other", status, retry_after


def _retry_after(exc: BaseException) -> float | None:
    for headers in (
        getattr(exc, "litellm_response_headers", None),
        getattr(getattr(exc, "response", None), "headers", None),
    ):
        if headers:
            try:
                value = {str(k).lower(): v for k, v in dict(headers).items()}.get("retry-after")
            except (TypeError, ValueError):
                continue
            seconds = parse_retry_after(value)
            if seconds is not None:
                return seconds
    return None


class ApiClient(CachedCalls):
    """An ``LLMClient`` for ``backend: api``. Create it anywhere; use it only from one event loop."""

    def __init__(
        self,
        cfg: ApiBackendConfig,
        role: str,
        cache: ResponseCache | None = None,
        seed: int | None = None,
    ):
        super().__init__(cfg, role, cache, seed)
        self._key = self._read_key(cfg, role)
        # Created on first use, inside the event loop that will await them.
        self._sem: asyncio.Semaphore | None = None
        self._rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self._tpm = TokenBucket(cfg.tpm) if cfg.tpm else None

    @staticmethod
    def _read_key(cfg: ApiBackendConfig, role: str) -> str:
        return read_api_key(cfg, role)

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])

    async def aclose(self) -> None:
        return None

    async def _attempts(
        self,
        messages: Sequence[Message],
        temperature: float,
        max_tokens: int,
        parse: Parser | None,
        first_attempt: int = 0,
        stats: ApiStats | None = None,
    ) -> CallResult:
        """Attempts ``first_attempt`` .. ``retries`` of one call, counted into ``stats`` (default ``self.stats``).

        The worker process continues a call whose reply the trainer's parser rejected from the next attempt.
        """
        cfg = self.cfg
        stats = self.stats if stats is None else stats
        if self._sem is None:
            self._sem = asyncio.Semaphore(cfg.max_concurrency)
        res = CallResult(ok=False, endpoint=self.endpoint)
        estimate = sum(len(m.get("content") or "") for m in messages) / 4 + max_tokens
        for attempt in range(first_attempt, cfg.retries + 1):
            res.attempts = attempt + 1
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(estimate)
            async with self._sem:
                t_req = time.monotonic()
                try:
                    # A guard above litellm's own timeout: a hung connection must never hang an episode.
                    resp = await asyncio.wait_for(
                        litellm.acompletion(
                            model=self.model,
                            api_base=cfg.api_base,
                            api_key=self._key,
                            messages=list(messages),
                            temperature=temperature,
                            max_tokens=max_tokens,
                            timeout=cfg.timeout_s,
                            max_retries=0,
                            extra_body=cfg.extra_body or None,
                        ),
                        timeout=cfg.timeout_s + 5,
                    )
                    exc: BaseException | None = None
                except Exception as e:  # classified below; never escapes as an exception
                    resp, exc = None, e
                stats.add_latency(time.monotonic() - t_req)
            if exc is None:
                kind, status, retry_after, detail = self._accept(resp, res, parse, estimate, stats)
                if kind is None:
                    res.ok, res.error, res.kind = True, None, None
                    return res
            else:
                kind, status, retry_after = classify(exc)
                detail = self._redact(_LITELLM_PREFIX.sub("", " ".join(str(exc).split())))[:300]
            res.kind, res.status = kind, status
            line = f"{kind}{f' {status}' if status else ''}: {detail}"
            res.errors_seen.append(line)
            retryable = kind in RETRYABLE or (kind == "parse" and temperature > 0)
            if not retryable or attempt == cfg.retries:
                break
            res.retries += 1
            stats.add("retries")
            await asyncio.sleep(
                backoff_delay(attempt, cfg.backoff_s, cfg.max_backoff_s, retry_after, self._rng)
            )
        res.error = (
            f"{self.endpoint}: {res.errors_seen[-1]} (after {res.attempts} attempt{'s' * (res.attempts > 1)})"
        )
        return res

    def _accept(
        self, resp: Any, res: CallResult, parse: Parser | None, estimate: float, stats: ApiStats
    ) -> tuple[ErrorKind | None, int | None, float | None, str]:
        """Fill ``res`` from a reply; return ``(None, ...)`` when it is usable, else why not."""
        try:
            text = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError, KeyError):
            return "malformed", None, None, "the reply has no choices[0].message"
        usage = getattr(resp, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0)
        ct = int(getattr(usage, "completion_tokens", 0) or 0)
        res.prompt_tokens += pt
        res.completion_tokens += ct
        stats.add("prompt_tokens", pt)
        stats.add("completion_tokens", ct)
        cost = (
            pt / 1000 * self.cfg.price_per_1k_prompt_tokens
            + ct / 1000 * self.cfg.price_per_1k_completion_tokens
        )
        res.cost += cost
        stats.add_cost(cost)
        if self._tpm is not None and (pt or ct):
            self._tpm.debit(pt + ct - estimate)
        res.text = text or ""
        if parse is None:
            res.value = res.text
            return None, None, None, ""
        try:
            res.value = parse(res.text)
        except Exception as e:
            shown = " ".join(res.text.split())[:120]
            return "parse", None, None, self._redact(f"{e}; reply was {shown!r}")
        return None, None, None, ""
