"""Data types shared by the LLM clients: call results, error kinds, the client protocol, redaction.

Imports nothing heavy. A call never raises for an API problem: it returns a ``CallResult`` whose
``ok`` is False and whose ``error`` says why, so the caller (an environment, a reward) marks its
episode invalid instead of inventing a reward.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# One reader of the key variable for the trainer, the API worker and the config checks (torch-free).
from trainer.config.api_keys import read_api_key  # noqa: F401  (re-exported for llm/api.py and llm/process.py)

Message = dict[str, str]  # {"role": "system"|"user"|"assistant"|"tool", "content": str}

# Where litellm and the OpenAI client go when api_base is unset.
DEFAULT_API_BASE = "https://api.openai.com/v1"

ErrorKind = Literal[
    "rate_limit",  # 429
    "server",  # 5xx
    "timeout",  # no reply within timeout_s
    "connection",  # refused, reset or dropped connection
    "malformed",  # the reply was not a valid completion (bad JSON, no choices)
    "bad_request",  # 400/422: wrong model name, unsupported field, context too long
    "auth",  # 401/403: missing or wrong key, no quota
    "not_found",  # 404: wrong api_base path or unknown model
    "parse",  # the completion arrived but the caller's parser rejected it
    "other",
]

# Worth another attempt; everything else fails at once (a bad key does not get better by waiting).
RETRYABLE: frozenset[str] = frozenset({"rate_limit", "server", "timeout", "connection", "malformed"})


@dataclass
class CallResult:
    """The outcome of one logical call (all its attempts).

    ``value`` is the parser's output when the caller gave one (else the text). On failure ``error``
    is a one-line reason that names the endpoint and never contains a key.
    """

    ok: bool
    text: str = ""
    value: Any = None
    error: str | None = None
    kind: ErrorKind | None = None
    status: int | None = None
    latency_s: float = 0.0  # wall time of the whole call: queueing, attempts and backoff
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cached: bool = False
    endpoint: str = ""
    errors_seen: list[str] = field(default_factory=list)  # one line per failed attempt, redacted


@dataclass
class ProbeResult:
    """What the run-start check of one endpoint found (``ApiClient.probe``); ``ok`` False stops the run."""

    ok: bool
    checked: str  # what was asked, e.g. "GET https://relay/v1/models"
    kind: ErrorKind | None = None
    status: int | None = None  # of a reply the server really sent
    reason: str = ""  # one line, redacted: the cause, or the server's own error body
    warning: str | None = None  # an answer that does not stop the run but deserves a line (a 5xx completion)


Parser = Callable[[str], Any]  # raises ValueError (or any Exception) on text it does not accept


@runtime_checkable
class LLMClient(Protocol):
    """What environments and rewards call; ``ApiClient`` (litellm) and ``LocalClient`` (HF) implement it.

    ``complete`` is a coroutine run on the client's event loop (``LoopThread``); many calls run
    concurrently and the client queues them behind its own concurrency and rate limits.
    """

    endpoint: str  # human-readable "openai/qwen-plus at https://..." for messages and logs
    stats: Any  # an ``ApiStats``

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        parse: Parser | None = None,
    ) -> CallResult: ...

    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------------- redaction

_PATTERNS = [
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer\s+)?[^\s'\",}]+"), r"\1\2[REDACTED]"),
    (re.compile(r"(?i)(api[_-]?key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"), r"\1[REDACTED]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1[REDACTED]"),
    (re.compile(r"\bsk-[A-Za-z0-9_*-]{6,}"), "sk-[REDACTED]"),
]


def redact(text: str, secrets: Sequence[str | None] = ()) -> str:
    """Remove API keys from ``text``: the given secret values and anything shaped like a key or auth header."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[REDACTED]")
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text
