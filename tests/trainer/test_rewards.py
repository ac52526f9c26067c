"""Rewards: table-driven checks of each built-in reward and the weighted sum."""

from __future__ import annotations

import pytest

from trainer.config import parse_config
from trainer.rewards import accuracy, build_rewards, extract_answer, length_penalty_value, score, step

BASE = {
    "name": "t",
    "model": {"path": "m"},
    "algorithm": {"name": "grpo"},
    "data": {"train": {"path": "x.jsonl"}},
}


@pytest.mark.parametrize(
    ("completion", "answer", "match", "expected"),
    [
        ("d", "d", "exact", 1.0),
        (" D. ", "d", "exact", 1.0),
        ("d e", "d", "exact", 0.0),
        ("d e", "d", "prefix", 1.0),
        ("dog", "d", "prefix", 0.0),
        ("the answer is 42", "42", "contains", 1.0),
        ("reasoning... \\boxed{42}", "42", "exact", 1.0),
        ("so, Answer: Paris\nmore", "paris", "exact", 1.0),
        ("anything", None, "exact", None),
        ("Answer: ", "x", "exact", 0.0),  # an empty final answer is wrong, not a crash
    ],
)
def test_accuracy(completion: str, answer: str | None, match: str, expected: float | None) -> None:
    assert accuracy(completion=completion, answer=answer, match=match) == expected


def test_extract_answer_prefers_the_last_box() -> None:
    assert extract_answer("\\boxed{1} then \\boxed{2}") == "2"


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0.0, 0.0), (0.3, 0.0), (0.4, -0.5), (0.5, -1.0), (0.9, -1.0)],
)
def test_length_penalty_curve(x: float, expected: float) -> None:
    kw = {"penalty_scale": 1.0, "max_penalty": 1.0, "peak_ratio": 0.3, "outer_ratio": 0.5}
    assert length_penalty_value(x, **kw) == pytest.approx(expected)


def test_length_penalty_is_clipped_at_max_penalty() -> None:
    kw = {"penalty_scale": 2.0, "max_penalty": 0.5, "peak_ratio": 0.3, "outer_ratio": 0.5}
    assert length_penalty_value(0.35, **kw) == pytest.approx(-0.5)


def test_step_reward_counts_steps() -> None:
    text = "Step 1: read\nStep 2: think\n- check\n3. answer"
    assert step(completion=text, step_bonus=0.1) == pytest.approx(0.4)
    assert step(completion=text, step_bonus=0.1, max_steps=2) == pytest.approx(0.2)


def test_weighted_sum_and_python_reward(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def shout(*, completion, bonus, **_):\n    return bonus if completion.isupper() else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_config({**BASE, "rewards": [
        {"type": "accuracy", "weight": 2.0},
        {"type": "python", "function": "my_rewards:shout", "kwargs": {"bonus": 0.5}},
        {"type": "format", "pattern": "[a-z]+", "weight": 0.1},
    ]})  # fmt: skip
    rewards = build_rewards(cfg.rewards)
    samples = [
        {"completion": "yes", "answer": "yes", "prompt": [], "row": {}, "num_tokens": 1, "max_new_tokens": 4},
        {"completion": "NO!", "answer": None, "prompt": [], "row": {}, "num_tokens": 2, "max_new_tokens": 4},
    ]
    totals, parts = score(rewards, samples)
    assert parts["accuracy"] == [1.0, None]
    assert parts["python"] == [None, 0.5]
    assert totals == pytest.approx([2.0 + 0.1, 0.5])


def test_python_reward_that_does_not_import_is_a_clear_error() -> None:
    from trainer.errors import UserError

    cfg = parse_config({**BASE, "rewards": [{"type": "python", "function": "no_such_module:f"}]})
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        build_rewards(cfg.rewards)
