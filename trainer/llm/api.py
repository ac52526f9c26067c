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
4. Classify a failure from the exception objects (``classify``): the cause chain tells a refused connection
   (which litellm reports as ``InternalServerError`` 500) from a server's 500 and carries the server's own
   error body, which goes into the result (redacted, bounded); retry the retryable kinds with
   exponential backoff and jitter, at least ``Retry-After``; a reply the caller's parser rejects
   is retried only when sampling (temperature > 0), since a greedy call would say the same again.
5. Count tokens, cost, latency and failures in ``stats``; errors are redacted (no key ever leaves).

``probe`` checks an endpoint once before a run's first step (``trainer.llm.probe.check_endpoints``).

A run does not use this class in its own process: ``trainer.llm.process.ProcessApiClient`` runs it in a
child process (``trainer.llm.worker``) so that litellm's Python work does not take the training loop's GIL
(issue 6); the cache, the caller's parser and the counters stay on the trainer's side.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp  # noqa: E402  (litellm's transport: its errors are in the cause chain)
import httpx  # noqa: E402
import litellm  # noqa: E402  (the environment variable must be set first)

from trainer.config.multiturn import ApiBackendConfig  # noqa: E402
from trainer.llm.cache import ResponseCache  # noqa: E402
from trainer.llm.calls import CachedCalls  # noqa: E402
from trainer.llm.limits import TokenBucket, backoff_delay, parse_retry_after  # noqa: E402
from trainer.llm.stats import ApiStats  # noqa: E402
from trainer.llm.types import (  # noqa: E402
    DEFAULT_API_BASE,
    RETRYABLE,
    CallResult,
    ErrorKind,
    Message,
    Parser,
    ProbeResult,
    read_api_key,
    redact,
)

litellm.suppress_debug_info = True  # its "Give Feedback" banner goes to stdout on every error

# Message fragments litellm leaves in an InternalServerError when no HTTP reply was parsed: the fallback when
# the exception carries no cause (the cause chain is read first; message wording changes between releases).
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
# Failures below HTTP: no reply was parsed, so the status litellm gives (500, or 408) is not the server's.
_TRANSPORT = (httpx.TransportError, aiohttp.ClientConnectionError, OSError, json.JSONDecodeError)
_TIMEOUTS = (httpx.TimeoutException, asyncio.TimeoutError, TimeoutError)
_AUTH = (401, 402, 403)  # a missing or wrong key, no quota
_BODY_CHARS = 300  # of a server's error body in a result's error line
PROBE_TIMEOUT_S = 10.0  # the start-up GET /models (the completion fallback has the call's own timeout_s)


class Failure(NamedTuple):
    """What went wrong in one attempt. ``status`` is the HTTP status of a reply the server really sent (None
    when none arrived); ``detail`` is one line, not yet redacted: the server's own body when there is one."""

    kind: ErrorKind
    status: int | None
    retry_after_s: float | None
    detail: str


def classify(exc: BaseException, api_base: str | None = None, timeout_s: float | None = None) -> Failure:
    """The ``Failure`` of an exception raised by ``litellm.acompletion`` (or the OpenAI client).

    Read from the exception objects, not from their wording: the cause chain says whether an HTTP reply
    arrived (litellm reports a refused connection as ``InternalServerError`` 500, CONTEXT §6) and holds the
    server's body (litellm 1.110 no longer copies it into the message). Message hints are the last resort."""
    chain = _chain(exc)
    retry_after = _retry_after(chain)
    # A reply that arrived (httpx's own status error) wins over a transport error met on the way (a chain's
    # __context__ can hold one a library caught and moved past).
    replied = any(isinstance(e, httpx.HTTPStatusError) for e in chain)
    transport = not replied and any(isinstance(e, _TRANSPORT) for e in chain)
    if transport or (not replied and isinstance(exc, litellm.Timeout)):
        if any(isinstance(e, _TIMEOUTS) for e in chain) or isinstance(exc, litellm.Timeout):
            kind: ErrorKind = "timeout"
        elif any(isinstance(e, json.JSONDecodeError) for e in chain):
            kind = "malformed"
        else:
            kind = "connection"
        return Failure(kind, None, retry_after, _transport_detail(chain, kind, api_base, timeout_s))
    status = _status(chain)
    body = _server_body(chain)
    message = _LITELLM_PREFIX.sub("", " ".join(str(exc).split()))
    detail = body or message or type(exc).__name__
    lowered = message.lower()
    if status == 408:
        return Failure("timeout", status, retry_after, detail)
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return Failure("rate_limit", status, retry_after, detail)
    if isinstance(exc, litellm.APIConnectionError):
        return Failure("connection", None, retry_after, detail)
    if (
        isinstance(exc, (litellm.InternalServerError, litellm.ServiceUnavailableError))
        or (status or 0) >= 500
    ):
        if body is None and any(h in lowered for h in _CONNECTION_HINTS):
            return Failure("connection", None, retry_after, detail)
        if body is None and any(h in lowered for h in _MALFORMED_HINTS):
            return Failure("malformed", None, retry_after, detail)
        return Failure("server", status, retry_after, detail)
    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)) or status in _AUTH:
        return Failure("auth", status, retry_after, detail)
    if isinstance(exc, litellm.NotFoundError) or status == 404:
        return Failure("not_found", status, retry_after, detail)
    if isinstance(exc, litellm.BadRequestError) or status in (400, 413, 422):
        return Failure("bad_request", status, retry_after, detail)
    if isinstance(exc, (KeyError, IndexError)):
        return Failure("malformed", status, retry_after, detail)
    return Failure("other", status, retry_after, detail)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (litellm wraps the OpenAI client's error, which wraps
    httpx's, which wraps aiohttp's or the socket's)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 16 and all(e is not seen for seen in out):
        out.append(e)
        nxt = e.__cause__ or e.__context__ or getattr(e, "original_exception", None)
        e = nxt if isinstance(nxt, BaseException) else None
    return out


def _status(chain: list[BaseException]) -> int | None:
    # httpx's own error holds the reply as received; the wrappers above it copy its status (or invent one).
    for e in reversed(chain):
        if isinstance(e, httpx.HTTPStatusError):
            return e.response.status_code
    status = getattr(chain[0], "status_code", None)
    return status if isinstance(status, int) else None


def _server_body(chain: list[BaseException]) -> str | None:
    """The error body the server sent: a reply's text where an exception kept the reply, else the parsed
    ``body`` the OpenAI client attaches; None when neither is there."""
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, httpx.Response):
            try:
                text = response.text
            except Exception:  # a streamed reply nobody read: no body to show
                continue
            if text.strip():
                return text
    for e in chain:
        body = getattr(e, "body", None)
        if isinstance(body, str) and body.strip():
            return body
        if isinstance(body, (dict, list)) and body:
            return json.dumps(body, ensure_ascii=False, default=str)
    return None


def _address(chain: list[BaseException], api_base: str | None) -> str:
    """``host:port`` the connection went to: aiohttp's connector error names it; else the configured base."""
    for e in chain:
        host, port = getattr(e, "host", None), getattr(e, "port", None)
        if isinstance(host, str) and isinstance(port, int):
            return f"{host}:{port}"
    url = urlsplit(api_base or DEFAULT_API_BASE)
    return f"{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"


def _transport_detail(chain: list[BaseException], kind: ErrorKind, api_base: str | None,
                      timeout_s: float | None) -> str:  # fmt: skip
    """What happened below HTTP, in words a user can act on; the most specific cause (the deepest) first."""
    address = _address(chain, api_base)
    if kind == "timeout":
        return f"no reply from {address} within {timeout_s:g} s" if timeout_s else f"no reply from {address}"
    for e in reversed(chain):
        if isinstance(e, json.JSONDecodeError):
            return f"the reply is not valid JSON ({e})"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host {address.rsplit(':', 1)[0]} ({e.strerror or e})"
        if isinstance(e, ssl.SSLError):
            return f"TLS error with {address}: {e}"
        code = e.errno if isinstance(e, OSError) else None
        if isinstance(e, ConnectionRefusedError) or code == errno.ECONNREFUSED:
            return f"connection refused: {address}"
        if isinstance(e, ConnectionResetError) or code == errno.ECONNRESET:
            return f"connection reset by {address}"
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"{os.strerror(code).lower()}: {address}"
        if isinstance(e, (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError)):
            return f"{address} closed the connection without a reply"
    deepest = next((e for e in reversed(chain) if isinstance(e, _TRANSPORT)), chain[-1])
    return f"{type(deepest).__name__} with {address}: {' '.join(str(deepest).split())}"


def _excerpt(text: str) -> str:
    """One line of at most ``_BODY_CHARS``; redact before (a key cut in two would no longer match)."""
    line = " ".join(text.split())
    return line if len(line) <= _BODY_CHARS else line[: _BODY_CHARS - 3] + "..."


def _retry_after(chain: list[BaseException]) -> float | None:
    for e in chain:
        for headers in (
            getattr(e, "litellm_response_headers", None),
            getattr(getattr(e, "response", None), "headers", None),
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
        retries: int | None = None,
    ) -> CallResult:
        """Attempts ``first_attempt`` .. ``retries`` of one call, counted into ``stats`` (default ``self.stats``).

        The worker process continues a call whose reply the trainer's parser rejected from the next attempt;
        ``retries`` lowers ``cfg.retries`` (the start-up probe's completion).
        """
        cfg = self.cfg
        stats = self.stats if stats is None else stats
        last = cfg.retries if retries is None else min(cfg.retries, first_attempt + retries)
        if self._sem is None:
            self._sem = asyncio.Semaphore(cfg.max_concurrency)
        res = CallResult(ok=False, endpoint=self.endpoint)
        estimate = sum(len(m.get("content") or "") for m in messages) / 4 + max_tokens
        for attempt in range(first_attempt, last + 1):
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
                kind, status, retry_after, detail = classify(exc, cfg.api_base, cfg.timeout_s)
                detail = _excerpt(self._redact(detail))
            res.kind, res.status = kind, status
            line = f"{kind}{f' {status}' if status else ''}: {detail}"
            res.errors_seen.append(line)
            retryable = kind in RETRYABLE or (kind == "parse" and temperature > 0)
            if not retryable or attempt == last:
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

    async def probe(self) -> ProbeResult:
        """Check once, before a run's first step, that the endpoint answers and takes the key (issue 12).

        ``GET {api_base}/models`` first: no tokens, and OpenAI, DashScope, vLLM, SGLang and most relays want
        the key for it. A 2xx JSON answer, a 429 or a 5xx pass (the server answers HTTP; a broken model list
        is not the run's problem: ``transformers serve`` 5.23 answers 500 without a hub cache); 401/402/403
        and a connection that fails twice stop the run. Anything else (404/405 from a relay that does not
        serve the list, a timeout, a page that is not JSON) falls back to a 1-token completion through the
        real call path, which also checks the model name and ``extra_body``: there a failed connection, a
        timeout, 401/403, 404 and 400/422 stop the run, and a 429 or a 5xx after one retry passes with a
        warning (the run's retries and invalid-episode limit deal with an endpoint that stays that way).
        The probe's own tokens are not counted in ``stats``.
        """
        cfg = self.cfg
        base = (cfg.api_base or DEFAULT_API_BASE).rstrip("/")
        checked = f"GET {base}/models"
        timeout = min(cfg.timeout_s, PROBE_TIMEOUT_S)
        failure: Failure | None = None
        for attempt in range(2):
            failure = await self._get_models(base, timeout)
            if failure is None:
                return ProbeResult(True, checked)
            if failure.kind not in ("connection", "timeout"):
                break
            if attempt == 0:
                await asyncio.sleep(min(cfg.backoff_s, 1.0))  # a relay restarting, a dropped connection
        assert failure is not None
        if failure.kind in ("auth", "connection"):
            reason = _excerpt(self._redact(failure.detail))
            return ProbeResult(False, checked, failure.kind, failure.status, reason)
        if failure.kind in ("rate_limit", "server"):
            return ProbeResult(True, checked, failure.kind, failure.status)
        # The list is not served (or not as JSON): ask for one token the way every call of the run will.
        answered = f"{failure.kind}{f' {failure.status}' if failure.status else ''}"
        checked = f"POST {base}/chat/completions, 1 token (GET /models: {answered})"
        ping = [{"role": "user", "content": "ping"}]
        res = await self._attempts(ping, cfg.temperature, 1, None, stats=ApiStats(self.role), retries=1)
        if res.ok:
            return ProbeResult(True, checked)
        reason = res.errors_seen[-1].split(": ", 1)[-1] if res.errors_seen else (res.error or "")
        if res.kind in ("connection", "timeout", "auth", "not_found", "bad_request"):
            return ProbeResult(False, checked, res.kind, res.status, reason)
        seen = res.errors_seen[-1] if res.errors_seen else res.error
        warning = f"{self.endpoint}: {seen} ({checked}); starting anyway"
        return ProbeResult(True, checked, res.kind, res.status, reason, warning)

    async def _get_models(self, base: str, timeout: float) -> Failure | None:
        """None when ``GET {base}/models`` answers 2xx JSON, else why not (as ``classify`` says of a call)."""
        try:
            # The header litellm sends on every call ("none" without api_key_env, as there); redirects followed
            # and proxy variables honoured, as the OpenAI client under litellm does.
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as http:
                r = await http.get(base + "/models", headers={"Authorization": f"Bearer {self._key}"})
        except Exception as e:  # classified; never escapes
            return classify(e, base, timeout)
        if r.is_success:
            try:
                r.json()
                return None
            except ValueError:
                return Failure("malformed", r.status_code, None, f"not JSON: {r.text}")
        try:
            r.raise_for_status()
        except httpx.HTTPStatusError as e:
            return classify(e, base, timeout)
        return Failure("other", r.status_code, None, r.text)

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
