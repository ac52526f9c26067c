"""The invalid-episode monitor: when too many recent episodes were invalid, the run must stop and say why.

Invalid episodes (API calls that failed after their retries, judge replies that did not parse) are
excluded from the loss. A few are noise; many mean the endpoint is down, the key or model name is
wrong, or the quota ran out, and training on the few valid ones would waste the GPU. The trainer
feeds every finished episode to ``InvalidMonitor.add`` and, when ``exceeded()``, saves a checkpoint
and raises ``TooManyInvalidEpisodes`` whose message names the endpoints and the errors seen.

    monitor = InvalidMonitor(cfg.user_simulator.max_invalid_rate, cfg.user_simulator.invalid_window)
    for r in results: monitor.add(r.invalid)
    metrics |= monitor.metrics()          # episodes/invalid, episodes/invalid_rate
    if monitor.exceeded(): save_checkpoint(); raise monitor.error([user.stats, judge.stats])
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from trainer.errors import EXIT_FAILED, UserError
from trainer.llm.stats import ApiStats


class TooManyInvalidEpisodes(UserError):
    exit_code = EXIT_FAILED


class InvalidMonitor:
    """Invalid rate over the newest ``window`` episodes; needs at least ``min_episodes`` before judging."""

    def __init__(self, max_rate: float, window: int, min_episodes: int | None = None):
        self.max_rate = max_rate
        self.window: deque[bool] = deque(maxlen=window)
        self.min_episodes = min_episodes if min_episodes is not None else min(window, 16)
        self.total = 0
        self.invalid = 0  # cumulative
        self.step_total = 0
        self.step_invalid = 0
        self.reasons: deque[str] = deque(maxlen=5)

    def add(self, invalid: str | None) -> None:
        bad = invalid is not None
        self.window.append(bad)
        self.total += 1
        self.step_total += 1
        if bad:
            self.invalid += 1
            self.step_invalid += 1
            self.reasons.append(invalid)

    @property
    def rate(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    def exceeded(self) -> bool:
        return len(self.window) >= self.min_episodes and self.rate > self.max_rate

    def metrics(self, reset_step: bool = True) -> dict[str, float]:
        """``episodes/invalid`` (this step), ``episodes/invalid_rate`` (this step), ``episodes/invalid_total``."""
        out = {
            "episodes/invalid": float(self.step_invalid),
            "episodes/invalid_rate": self.step_invalid / self.step_total if self.step_total else 0.0,
            "episodes/invalid_total": float(self.invalid),
        }
        if reset_step:
            self.step_total = self.step_invalid = 0
        return out

    def error(self, stats: Sequence[ApiStats]) -> TooManyInvalidEpisodes:
        kinds: Counter[str] = Counter()
        for s in stats:
            kinds.update(s.error_kinds())
        endpoints = ", ".join(s.endpoint for s in stats if s.endpoint) or "(no API backend)"
        problems = [
            f"{sum(self.window)} of the last {len(self.window)} episodes were invalid "
            f"({self.rate:.0%} > max_invalid_rate {self.max_rate:.0%})",
            f"endpoints: {endpoints}",
        ]
        if kinds:
            problems.append("errors seen: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
        problems += [f"recent: {r}" for r in list(self.reasons)[-3:]]
        return TooManyInvalidEpisodes(
            "user_simulator.max_invalid_rate",
            problems,
            hint="check api_base, the model name and the key variable (a checkpoint was saved; the run resumes from "
            "it); raise user_simulator.retries or timeout_s for a slow relay",
        )
