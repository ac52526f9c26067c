"""Counters of one API backend: calls, failures, retries, tokens, cost, latency, budget.

Updated on the event-loop thread, read from the training thread, hence the lock. Counters and cost
are cumulative over the run (and restored on resume through ``state_dict``); latency percentiles
cover the window since the last ``snapshot(reset_window=True)``, i.e. one training step.

Metric keys (``snapshot`` / ``merge_snapshots``):

=======================  ===========================================================================
``api/calls``            logical calls that reached the backend (cache hits excluded), cumulative
``api/failed``           calls that failed after all retries (or whose reply did not parse)
``api/retries``          retry attempts
``api/cache_hits``       calls answered from the SQLite cache
``api/prompt_tokens``    prompt tokens reported by the backend
``api/completion_tokens``
``api/cost``             cumulative cost from the configured per-1k-token prices
``api/latency_p50_s``    median latency of one HTTP attempt in this window
``api/latency_p95_s``
=======================  ===========================================================================
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

_COUNTERS = ("calls", "failed", "retries", "cache_hits", "prompt_tokens", "completion_tokens")
_MAX_ERRORS = 20


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class ApiStats:
    """Thread-safe counters of one backend (``name`` is ``user_simulator`` or ``judge``)."""

    def __init__(self, name: str, endpoint: str = "", budget: float | None = None):
        self.name = name
        self.endpoint = endpoint
        self.budget = budget
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._cost = 0.0
        self._latencies: list[float] = []
        self._errors: deque[str] = deque(maxlen=_MAX_ERRORS)
        self._error_kinds: Counter[str] = Counter()

    # ------------------------------------------------------------------ updates (loop thread)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def add_cost(self, amount: float) -> None:
        with self._lock:
            self._cost += amount

    def add_latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def add_error(self, kind: str, line: str) -> None:
        """Record a redacted one-line error (kept: the newest few, for the invalid-rate stop message)."""
        with self._lock:
            self._error_kinds[kind] += 1
            self._errors.append(line)

    def absorb(self, delta: dict[str, Any]) -> None:
        """Add another ``ApiStats``'s ``state_dict()`` plus its ``latencies`` (the API worker's per-call counts)."""
        with self._lock:
            self._counts.update(delta.get("counts", {}))
            self._cost += float(delta.get("cost", 0.0))
            self._latencies.extend(delta.get("latencies", ()))

    # ------------------------------------------------------------------ reads (any thread)

    @property
    def cost(self) -> float:
        with self._lock:
            return self._cost

    @property
    def budget_exceeded(self) -> bool:
        """True once the cumulative cost passed ``budget``: the trainer saves a checkpoint and stops."""
        return self.budget is not None and self.cost > self.budget

    def recent_errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def error_kinds(self) -> dict[str, int]:
        with self._lock:
            return dict(self._error_kinds)

    def snapshot(self, reset_window: bool = False, prefix: str = "api/") -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {f"{prefix}{k}": float(self._counts[k]) for k in _COUNTERS}
            out[f"{prefix}cost"] = self._cost
            out[f"{prefix}latency_p50_s"] = percentile(self._latencies, 50)
            out[f"{prefix}latency_p95_s"] = percentile(self._latencies, 95)
            if reset_window:
                self._latencies = []
            return out

    def latencies(self) -> list[float]:
        with self._lock:
            return list(self._latencies)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self._counts), "cost": self._cost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._counts = Counter(state.get("counts", {}))
            self._cost = float(state.get("cost", 0.0))


def merge_snapshots(stats: list[ApiStats], reset_window: bool = False) -> dict[str, float]:
    """Totals over backends under ``api/*`` plus each backend under ``api/<name>/*``."""
    out: dict[str, float] = {}
    latencies: list[float] = []
    for s in stats:
        latencies.extend(s.latencies())
        per = s.snapshot(reset_window=reset_window, prefix=f"api/{s.name}/")
        out.update(per)
        for key, value in per.items():
            total = "api/" + key.rsplit("/", 1)[1]
            if "latency" not in total:
                out[total] = out.get(total, 0.0) + value
    out["api/latency_p50_s"] = percentile(latencies, 50)
    out["api/latency_p95_s"] = percentile(latencies, 95)
    return out
