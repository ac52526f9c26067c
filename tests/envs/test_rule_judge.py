"""The deterministic coverage judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.envs.intentiongym import Detail, load_intentions, rule_covered

BUDGET = Detail("Budget for the trip", 2, "What is your budget for the trip?", ("under 500 dollars",))
DATES = Detail("Travel dates", 3, "Which dates will you travel?", ("next weekend", "end of the month"))
PLACE = Detail(
    "Preferred type of destination", 3, "What kind of destination do you prefer?", ("beach", "mountains")
)
DETAILS = [BUDGET, DATES, PLACE]


@pytest.mark.parametrize(
    ("question", "covered"),
    [
        ("What is your budget for the trip?", [0]),
        ("How much budget do you have for this trip?", [0]),
        ("When do you travel, which dates?", [1]),
        ("Would you rather go to the beach?", [2]),  # names an option
        ("Do you prefer a beach or mountains destination?", [2]),
        ("What's your budget and which dates do you travel?", [0, 1]),
        ("Hello! How are you today?", []),
        ("", []),
        ("What is your favourite colour?", []),
    ],
)
def test_rule_covered(question: str, covered: list[int]) -> None:
    assert rule_covered(question, DETAILS) == covered


def test_threshold_is_respected() -> None:
    # "budget" alone is 1 of 2 inquiry keywords (budget, trip): covered at 0.5, not at 0.75.
    assert rule_covered("Any budget?", [BUDGET], threshold=0.5) == [0]
    assert rule_covered("Any budget?", [BUDGET], threshold=0.75) == []


def test_each_inquiry_covers_exactly_its_detail(sample: dict[str, Path]) -> None:
    for item in load_intentions(sample["train_intentions"]).values():
        for i, detail in enumerate(item.details):
            assert rule_covered(detail.inquiry, item.details) == [i], (item.task, detail.inquiry)


def test_rule_matches_gives_the_evidence() -> None:
    from trainer.envs.intentiongym import rule_matches

    assert rule_matches("Would you rather go to the beach?", DETAILS) == {2: "option 'beach'"}
    assert rule_matches("What is your budget for the trip?", DETAILS) == {
        0: "inquiry keywords ['budget', 'trip'] of ['budget', 'trip']; "
        "description keywords ['budget', 'trip'] of ['budget', 'trip']"
    }
    assert rule_matches("Hello!", DETAILS) == {}
