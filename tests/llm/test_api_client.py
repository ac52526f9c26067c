"""The API clients against a real ``transformers serve`` behind the fault proxy (litellm is not mocked).

Every test runs twice: with ``ProcessApiClient`` (litellm in the API worker process, what a run uses) and
with ``ApiClient`` on the test's event loop; both must behave the same.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from trainer.config.multiturn import ApiBackendConfig
from trainer.errors import UserError
from trainer.llm import LoopThread, make_client, open_cache
from trainer.llm.api import ApiClient
from trainer.llm.process import ProcessApiClient
from trainer.testing.fault_proxy import FaultPlan, FaultProxy
from trainer.testing.serve import TransformersServer, free_port

HI = [{"role": "user", "content": "hi"}]
KIND = "process"


@pytest.fixture(autouse=True, params=["process", "in_process"])
def client_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "KIND", request.param)
    return request.param


def client_for(
    server: TransformersServer, base: str, key_env: str | None = None, cache_dir: Path | None = None, **kw
) -> ApiClient | ProcessApiClient:
    settings = dict(
        model=server.model, api_base=base, api_key_env=key_env, timeout_s=2.0, retries=3, backoff_s=0.02,
        max_backoff_s=2.0, max_tokens=4, temperature=0.7,
    )  # fmt: skip
    settings.update(kw)
    cfg = ApiBackendConfig(**settings)
    cache = open_cache(cache_dir) if cache_dir else None
    client = make_client(cfg, "user_simulator", cache, in_process=KIND == "in_process")
    assert isinstance(client, ApiClient if KIND == "in_process" else ProcessApiClient)
    return client


def test_success_counts_tokens_and_cost(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(
        server,
        proxy.url + "/v1",
        price_per_1k_prompt_tokens=1.0,
        price_per_1k_completion_tokens=2.0,
        budget=1e-6,
    )
    res = loop.run(client.complete(HI))
    assert res.ok and res.error is None and res.attempts == 1 and res.retries == 0
    assert isinstance(res.text, str) and res.value == res.text
    assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 4
    assert res.cost == pytest.approx(res.prompt_tokens / 1000 + 2 * res.completion_tokens / 1000)
    snap = client.stats.snapshot()
    assert snap["api/calls"] == 1 and snap["api/failed"] == 0 and snap["api/cost"] == pytest.approx(res.cost)
    assert snap["api/latency_p50_s"] > 0
    assert client.stats.budget_exceeded  # 1e-6 is less than one call
    assert proxy.stats()["forwarded"] == 1


def test_retries_recover_from_every_transient_fault(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(server, proxy.url + "/v1", retries=5, timeout_s=1.0)
    proxy.set_plan(FaultPlan(stall_s=5))
    proxy.script("rate_limit", "server_error", "malformed", "drop", "stall")
    res = loop.run(client.complete(HI))
    assert res.ok, res.errors_seen
    assert res.attempts == 6 and res.retries == 5
    kinds = [line.split(" ", 1)[0].rstrip(":") for line in res.errors_seen]
    assert kinds == ["rate_limit", "server", "malformed", "connection", "timeout"]
    # The server's own error bodies, and for failures below HTTP the cause with no status (litellm calls them
    # all 500, or 408): what the exception objects carry, not a library's wording of them (issue 12).
    address = f"127.0.0.1:{proxy.port}"
    assert res.errors_seen == [
        'rate_limit 429: {"error": {"message": "rate limit exceeded (injected)", "type": "rate_limit_error", '
        '"code": 429}}',
        'server 500: {"error": {"message": "internal error (injected)", "type": "server_error", "code": 500}}',
        "malformed: the reply is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 55 (char 54))",
        f"connection: {address} closed the connection without a reply",
        f"timeout: no reply from {address} within 1 s",
    ]
    assert client.stats.snapshot()["api/retries"] == 5
    assert proxy.stats()["faults"] == {
        "rate_limit": 1,
        "server_error": 1,
        "malformed": 1,
        "drop": 1,
        "stall": 1,
    }


def test_retry_after_is_honoured(server: TransformersServer, proxy: FaultProxy, loop: LoopThread) -> None:
    client = client_for(server, proxy.url + "/v1", backoff_s=0.01)
    proxy.set_plan(FaultPlan(retry_after_s=0.8))
    proxy.script("rate_limit")
    t0 = time.monotonic()
    res = loop.run(client.complete(HI))
    assert res.ok and res.retries == 1
    assert time.monotonic() - t0 >= 0.8


def test_unrecoverable_failure_is_a_result_with_a_reason(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(server, proxy.url + "/v1", retries=2)
    proxy.script("server_error", "server_error", "server_error")
    res = loop.run(client.complete(HI))
    assert not res.ok and res.value is None
    assert res.kind == "server" and res.status == 500 and res.attempts == 3
    assert (
        res.error is not None
        and res.error.startswith("user_simulator (openai/")
        and "after 3 attempts" in res.error
    )
    assert proxy.stats()["requests"] == 3
    snap = client.stats.snapshot()
    assert snap["api/calls"] == 1 and snap["api/failed"] == 1 and snap["api/retries"] == 2
    assert client.stats.error_kinds() == {"server": 1}


def test_client_errors_are_not_retried(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(server, proxy.url + "/v1")
    client.model = "openai/not-the-served-model"  # the server is pinned to one model: 400
    res = loop.run(client.complete(HI))
    assert not res.ok and res.kind == "bad_request" and res.status == 400 and res.attempts == 1
    assert "pinned" in (res.error or "")
    # The body exactly as the server sent it (litellm 1.110 no longer puts it in its message).
    detail = f"Server is pinned to '{server.model}'; requested 'not-the-served-model'."
    body = json.dumps({"detail": detail}, separators=(",", ":"))
    assert res.errors_seen == [f"bad_request 400: {body}"]


def test_extra_body_reaches_the_server(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    # transformers serve rejects fields it does not know, which proves extra_body is sent.
    client = client_for(server, proxy.url + "/v1", extra_body={"enable_thinking": False})
    res = loop.run(client.complete(HI))
    assert not res.ok and res.kind == "bad_request" and "enable_thinking" in (res.error or "")
    assert res.errors_seen == [
        'bad_request 422: {"detail":"Unexpected fields in the request: {\'enable_thinking\'}"}'
    ]


def test_refused_connection_is_classified(server: TransformersServer, loop: LoopThread) -> None:
    port = free_port()
    client = client_for(server, f"http://127.0.0.1:{port}/v1", retries=1)
    res = loop.run(client.complete(HI))
    assert not res.ok and res.kind == "connection" and res.attempts == 2
    # The cause, read from the exception's cause chain; no status (litellm reports it as a 500).
    assert res.status is None
    assert res.errors_seen == [f"connection: connection refused: 127.0.0.1:{port}"] * 2
    assert res.error is not None and res.error.endswith(
        f"connection refused: 127.0.0.1:{port} (after 2 attempts)"
    )


def test_max_concurrency_queues_and_is_never_exceeded(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(server, proxy.url + "/v1", max_concurrency=3, retries=6)
    proxy.set_plan(
        FaultPlan(latency_s=0.15, rate=0.25, kinds=("rate_limit", "server_error"), retry_after_s=0.05, seed=1)
    )

    async def many() -> list:
        return await asyncio.gather(
            *(client.complete([{"role": "user", "content": f"q{i}"}]) for i in range(12))
        )

    results = loop.run(many())
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    stats = proxy.stats()
    assert stats["max_in_flight"] == 3  # reached (a queue, not one at a time) and never exceeded
    assert stats["forwarded"] == 12 and sum(stats["faults"].values()) > 0


def test_deterministic_calls_are_cached(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, tmp_path: Path
) -> None:
    client = client_for(server, proxy.url + "/v1", cache_dir=tmp_path, temperature=0.0)
    first = loop.run(client.complete(HI))
    again = loop.run(client.complete(HI))
    assert first.ok and not first.cached and again.cached and again.text == first.text
    assert proxy.stats()["requests"] == 1
    assert client.stats.snapshot()["api/cache_hits"] == 1 and client.stats.snapshot()["api/calls"] == 1
    # A resumed run (a new client on the same file) does not pay again; other messages are a miss.
    resumed = client_for(server, proxy.url + "/v1", cache_dir=tmp_path, temperature=0.0)
    assert loop.run(resumed.complete(HI)).cached
    assert not loop.run(resumed.complete([{"role": "user", "content": "other"}])).cached
    # Sampling calls are never cached.
    sampler = client_for(server, proxy.url + "/v1", cache_dir=tmp_path, temperature=0.7)
    assert not loop.run(sampler.complete(HI)).cached and not loop.run(sampler.complete(HI)).cached
    assert proxy.stats()["requests"] == 4


def test_parse_failures_are_failures(server: TransformersServer, proxy: FaultProxy, loop: LoopThread) -> None:
    def strict(text: str) -> dict:
        return json.loads("<not json>" + text)

    greedy = client_for(server, proxy.url + "/v1", temperature=0.0, cache=False, retries=2)
    res = loop.run(greedy.complete(HI, parse=strict))
    assert not res.ok and res.kind == "parse" and res.attempts == 1  # the same greedy reply would come back
    sampled = client_for(server, proxy.url + "/v1", temperature=0.9, retries=2)
    res = loop.run(sampled.complete(HI, parse=strict))
    assert not res.ok and res.kind == "parse" and res.attempts == 3
    assert sampled.stats.snapshot()["api/failed"] == 1


def test_the_key_never_leaves(
    server: TransformersServer,
    proxy: FaultProxy,
    loop: LoopThread,
    marker_key: tuple[str, str],
    tmp_path: Path,
) -> None:
    key_env, key = marker_key
    client = client_for(
        server, proxy.url + "/v1", key_env=key_env, cache_dir=tmp_path, temperature=0.0, retries=1
    )
    ok = loop.run(client.complete(HI))
    proxy.script("server_error", "drop")
    failed = loop.run(client.complete([{"role": "user", "content": "fail"}]))
    client.model = "openai/wrong"
    bad = loop.run(client.complete([{"role": "user", "content": "bad"}]))
    assert ok.ok and not failed.ok and not bad.ok
    assert proxy.stats()["with_authorization"] == 4  # the key was sent ...
    texts = (
        [repr(r) for r in (ok, failed, bad)] + client.stats.recent_errors() + [repr(client.stats.snapshot())]
    )
    assert all(key not in t for t in texts)  # ... and appears in no result or error
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key.encode() not in blobs  # nor in the cache files
    assert key not in repr(client.cfg)


def test_missing_key_variable_is_a_clear_error(
    server: TransformersServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USERLOOP_ABSENT_KEY", raising=False)
    with pytest.raises(UserError) as err:
        client_for(server, "http://127.0.0.1:1/v1", key_env="USERLOOP_ABSENT_KEY")
    assert "USERLOOP_ABSENT_KEY is not set" in err.value.render()
