"""The invalid-rate stop: fires past the limit with a message naming the endpoint and the errors."""

from __future__ import annotations

from trainer.envs.invalid import InvalidMonitor, TooManyInvalidEpisodes
from trainer.errors import EXIT_FAILED
from trainer.llm.stats import ApiStats


def test_fires_past_the_rate_with_a_clear_message() -> None:
    monitor = InvalidMonitor(max_rate=0.2, window=10, min_episodes=10)
    for _ in range(8):
        monitor.add(None)
    monitor.add(
        "user_simulator (openai/qwen-plus at https://relay/v1): rate_limit 429: quota (after 5 attempts)"
    )
    monitor.add(
        "user_simulator (openai/qwen-plus at https://relay/v1): rate_limit 429: quota (after 5 attempts)"
    )
    assert monitor.rate == 0.2 and not monitor.exceeded()  # at the limit is fine
    monitor.add("user_simulator (openai/qwen-plus at https://relay/v1): timeout 408 (after 5 attempts)")
    assert monitor.exceeded()
    stats = ApiStats("user_simulator", "user_simulator (openai/qwen-plus at https://relay/v1)")
    stats.add_error("rate_limit", "x")
    stats.add_error("rate_limit", "x")
    stats.add_error("timeout", "y")
    err = monitor.error([stats])
    assert isinstance(err, TooManyInvalidEpisodes) and err.exit_code == EXIT_FAILED
    text = err.render()
    assert "3 of the last 10 episodes were invalid (30% > max_invalid_rate 20%)" in text
    assert "https://relay/v1" in text and "rate_limit x2, timeout x1" in text
    assert "timeout 408" in text and err.hint


def test_needs_enough_episodes_and_counts_per_step() -> None:
    monitor = InvalidMonitor(max_rate=0.2, window=100, min_episodes=4)
    monitor.add("boom")
    assert not monitor.exceeded()  # one episode is not a trend
    for _ in range(3):
        monitor.add(None)
    assert monitor.exceeded()  # 1 of 4
    assert monitor.metrics() == {
        "episodes/invalid": 1.0,
        "episodes/invalid_rate": 0.25,
        "episodes/invalid_total": 1.0,
    }
    monitor.add(None)
    assert monitor.metrics()["episodes/invalid"] == 0.0
