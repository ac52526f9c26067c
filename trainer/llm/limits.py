"""Rate limits and retry delays for API clients: token buckets for rpm/tpm, backoff with jitter.

Relays limit per minute with a per-second burst limit (DashScope, CONTEXT §6), so a bucket holds at
most one second's worth of its per-minute budget and refills continuously: calls ramp up instead
of bursting a minute's quota at once. Waiting for a bucket is a queue, never a rejection.
"""

from __future__ import annotations

import asyncio
import random
import time


class TokenBucket:
    """``per_minute`` units per minute, at most ``per_minute / 60`` (≥ 1 request's worth) banked.

    Must be used from one event loop. ``acquire`` waits until ``n`` units are available;
    ``debit`` adjusts after the fact (a tpm bucket learns the real token count after the reply),
    and may drive the level negative, which delays the next callers.
    """

    def __init__(self, per_minute: float, burst: float | None = None):
        self.rate = per_minute / 60.0  # units per second
        self.capacity = max(burst if burst is not None else self.rate, 1.0)
        self.level = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` units (clamped to the capacity so a large request is possible at all); return seconds waited."""
        n = min(n, self.capacity)
        waited = 0.0
        # The lock makes callers queue in arrival order instead of racing for each refill.
        async with self._lock:
            while True:
                self._refill()
                if self.level >= n:
                    self.level -= n
                    return waited
                delay = (n - self.level) / self.rate
                await asyncio.sleep(delay)
                waited += delay

    def debit(self, n: float) -> None:
        self._refill()
        self.level -= n


def backoff_delay(
    retry: int,
    base_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number ``retry`` (0-based): ``base·2^retry`` with "equal jitter", at least Retry-After.

    Equal jitter (half fixed, half random) spreads synchronized clients apart while keeping a floor,
    so a burst of 429s does not come back as the same burst.
    """
    rng = rng or random
    expo = min(max_s, base_s * (2**retry))
    delay = expo / 2 + rng.uniform(0, expo / 2)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(delay, max_s)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
