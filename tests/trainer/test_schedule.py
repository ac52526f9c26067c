"""LR schedule: warm-up, cosine decay to the floor, plateau scaling."""

from __future__ import annotations

import pytest

from trainer.config.schema import AlgorithmConfig
from trainer.schedule import LRSchedule


def _sched(**scheduler) -> LRSchedule:
    return LRSchedule(AlgorithmConfig(name="sft", lr=1.0, scheduler=scheduler), total_steps=10)


def test_warmup_is_linear_and_reaches_the_peak() -> None:
    s = _sched(type="constant", warmup_steps=3)
    assert [s.lr(i) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_decays_to_the_floor_at_the_last_step() -> None:
    s = _sched(type="cosine", min_lr_ratio=0.1)
    assert s.lr(0) == pytest.approx(1.0)
    assert s.lr(5) == pytest.approx(0.55)
    assert s.lr(10) == pytest.approx(0.1)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10))


def test_plateau_scale_multiplies() -> None:
    s = _sched(type="plateau")
    assert s.lr(4, scale=0.25) == pytest.approx(0.25)
