"""The client's parts without a server: event-loop thread, rate buckets, backoff, stats, redaction, cache."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

from trainer.llm.cache import ResponseCache, cache_key
from trainer.llm.limits import TokenBucket, backoff_delay, parse_retry_after
from trainer.llm.loop import LoopThread
from trainer.llm.stats import ApiStats, merge_snapshots, percentile
from trainer.llm.types import redact


def test_loop_thread_runs_coroutines_off_the_caller_thread() -> None:
    with LoopThread() as lt:

        async def where() -> str:
            await asyncio.sleep(0.01)
            return threading.current_thread().name

        futures = [lt.submit(where()) for _ in range(5)]
        assert {f.result(5) for f in futures} == {"userloop-api"}
        assert lt.run(where()) == "userloop-api"
        never = lt.submit(asyncio.sleep(3600))
    assert never.cancelled()  # close() cancels what is still running
    assert not lt.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        lt.submit(asyncio.sleep(0))


def test_token_bucket_paces_after_the_burst() -> None:
    async def go() -> float:
        bucket = TokenBucket(per_minute=600)  # 10 per second, bursts of 10
        t0 = time.monotonic()
        for _ in range(15):
            await bucket.acquire()
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    assert 0.4 <= elapsed < 1.0  # 10 at once, then 5 more at 10 per second


def test_token_bucket_debit_delays_later_callers() -> None:
    async def go() -> float:
        bucket = TokenBucket(per_minute=60 * 100)  # 100 tokens per second
        await bucket.acquire(100)
        bucket.debit(20)  # the reply used more than reserved
        t0 = time.monotonic()
        await bucket.acquire(10)
        return time.monotonic() - t0

    assert asyncio.run(go()) >= 0.25


@pytest.mark.parametrize(
    ("retry", "retry_after", "low", "high"),
    [
        (0, None, 0.5, 1.0),
        (1, None, 1.0, 2.0),
        (3, None, 4.0, 8.0),
        (10, None, 15.0, 30.0),
        (0, 5.0, 5.0, 5.0),
    ],
)
def test_backoff_delay(retry: int, retry_after: float | None, low: float, high: float) -> None:
    rng = random.Random(0)
    for _ in range(50):
        assert low <= backoff_delay(retry, 1.0, 30.0, retry_after, rng) <= high


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None and parse_retry_after(None) is None


def test_stats_snapshot_window_and_merge() -> None:
    user, judge = ApiStats("user_simulator", budget=1.0), ApiStats("judge")
    for s in range(1, 11):
        user.add_latency(s / 10)
    user.add("calls", 10)
    user.add_cost(0.5)
    judge.add("calls", 2)
    judge.add_latency(5.0)
    assert percentile([1, 2, 3, 4], 50) in (2, 3) and percentile([], 95) == 0.0
    merged = merge_snapshots([user, judge], reset_window=True)
    assert (
        merged["api/calls"] == 12
        and merged["api/user_simulator/calls"] == 10
        and merged["api/judge/calls"] == 2
    )
    assert merged["api/cost"] == 0.5 and merged["api/latency_p95_s"] == 5.0
    assert user.snapshot()["api/latency_p50_s"] == 0.0  # the window was reset, the counters were not
    assert user.snapshot()["api/calls"] == 10 and not user.budget_exceeded
    user.add_cost(0.6)
    assert user.budget_exceeded
    restored = ApiStats("user_simulator")
    restored.load_state_dict(user.state_dict())
    assert restored.cost == pytest.approx(1.1) and restored.snapshot()["api/calls"] == 10


@pytest.mark.parametrize(
    "text",
    [
        "Error code: 401 - Incorrect API key provided: sk-abcdef1234567890",
        "headers={'Authorization': 'Bearer abcdefgh12345678'}",
        "Authorization: Bearer abcdefgh12345678",
        'request failed: {"api_key": "abcdefgh12345678"}',
        "api_key=abcdefgh12345678 was rejected",
    ],
)
def test_redact(text: str) -> None:
    out = redact(text)
    assert "abcdefgh12345678" not in out and "1234567890" not in out and "[REDACTED]" in out


def test_redact_a_given_secret_anywhere() -> None:
    assert redact("oops my-own-secret-value leaked", ["my-own-secret-value"]) == "oops [REDACTED] leaked"


def test_cache_roundtrip(tmp_path: Path) -> None:
    key = cache_key("http://x/v1", "openai/m", [{"role": "user", "content": "hi"}], {"temperature": 0})
    assert key != cache_key(
        "http://x/v1", "openai/m", [{"role": "user", "content": "hi!"}], {"temperature": 0}
    )
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert cache.get(key) is None
    cache.put(key, "hello", 3, 1)
    cache.close()
    assert ResponseCache(tmp_path / "c.sqlite").get(key) == ("hello", 3, 1)
