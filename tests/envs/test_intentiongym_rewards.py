"""IntentionGym reward arithmetic, table-driven against the rules of CONTEXT §2."""

from __future__ import annotations

import pytest

from trainer.envs.base import aggregate
from trainer.envs.intentiongym import turn_reward


@pytest.mark.parametrize(
    ("importances", "expected"),
    [
        ([], 0.0),  # nothing new covered
        ([3], 1.0),
        ([2], 0.7),
        ([1], 0.4),
        ([3, 1], 0.8),  # highest is 3, one extra detail: 1.0 - 0.2
        ([1, 3], 0.8),  # order does not matter
        ([2, 2], 0.5),  # 0.7 - 0.2
        ([2, 1], 0.5),
        ([1, 1], 0.2),  # 0.4 - 0.2
        ([3, 2, 1], 0.6),  # 1.0 - 2 * 0.2
        ([1, 1, 1], 0.0),  # 0.4 - 0.4
        ([1, 1, 1, 1], 0.0),  # 0.4 - 0.6, clipped at 0
        ([2, 1, 1, 1], 0.1),  # 0.7 - 0.6
        ([3, 3, 3, 3, 3, 3], 0.0),  # 1.0 - 1.0
        ([3, 3, 3, 3, 3, 3, 3], 0.0),  # 1.0 - 1.2, clipped at 0
    ],
)
def test_turn_reward(importances: list[int], expected: float) -> None:
    assert turn_reward(importances) == pytest.approx(expected)
    assert 0.0 <= turn_reward(importances) <= 1.0


@pytest.mark.parametrize(
    ("rewards", "mode", "expected"),
    [
        ([1.0, 0.0, 0.7], "mean", 1.7 / 3),
        ([1.0, 0.0, 0.7], "sum", 1.7),
        ([1.0, 0.0, 0.7], "last", 0.7),
        ([], "mean", 0.0),
        ([], "sum", 0.0),
        ([], "last", 0.0),
        ([0.4], "mean", 0.4),
    ],
)
def test_aggregate(rewards: list[float], mode: str, expected: float) -> None:
    assert aggregate(rewards, mode) == pytest.approx(expected)  # type: ignore[arg-type]


def test_aggregate_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown score mode"):
        aggregate([1.0], "median")  # type: ignore[arg-type]
