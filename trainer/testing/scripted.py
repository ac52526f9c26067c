"""``ScriptedClient``: an ``LLMClient`` whose replies come from a Python function, for environment tests.

It keeps the client contract (parse failures and scripted failures come back as ``ok=False`` results
with a reason, counters in ``stats``) without any network, so environment and reward logic can be
tested table by table. API behaviour itself is tested against ``transformers serve``, not with this.

    client = ScriptedClient(lambda messages: '{"covered": [1]}')
    client = ScriptedClient(["first reply", ScriptedClient.FAIL, "third reply"])   # in call order
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from trainer.llm.stats import ApiStats
from trainer.llm.types import CallResult, Message, Parser


class ScriptedClient:
    FAIL = object()  # a scripted reply that fails like an API call out of retries

    def __init__(
        self,
        replies: Callable[[list[Message]], str | object] | Sequence[str | object],
        role: str = "scripted",
        latency_s: float = 0.0,
    ):
        self._fn = replies if callable(replies) else None
        self._queue = None if callable(replies) else list(replies)
        self.endpoint = f"{role} (scripted)"
        self.stats = ApiStats(role, self.endpoint)
        self.latency_s = latency_s
        self.calls: list[list[Message]] = []

    async def aclose(self) -> None:
        return None

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        parse: Parser | None = None,
    ) -> CallResult:
        self.calls.append(list(messages))
        self.stats.add("calls")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self._fn is not None:
            reply = self._fn(list(messages))
        else:
            assert self._queue, "ScriptedClient ran out of replies"
            reply = self._queue.pop(0)
        if reply is ScriptedClient.FAIL:
            return self._failed("server", "server 500: scripted failure")
        text = str(reply)
        try:
            value = parse(text) if parse else text
        except Exception as e:
            return self._failed("parse", f"parse: {e}; reply was {text[:120]!r}", text)
        return CallResult(ok=True, text=text, value=value, attempts=1, endpoint=self.endpoint)

    def _failed(self, kind: str, line: str, text: str = "") -> CallResult:
        self.stats.add("failed")
        error = f"{self.endpoint}: {line}"
        self.stats.add_error(kind, error)
        return CallResult(ok=False, text=text, error=error, kind=kind, attempts=1, endpoint=self.endpoint)  # type: ignore[arg-type]
