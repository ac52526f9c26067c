"""``single_turn``: one agent reply per prompt; the foundation's GRPO as the one-turn case of the loop.

The episode ends after the first reply. Its reward comes from ``score_fn(row, completion)`` when
one is given (sync or async; e.g. the configured ``rewards`` summed, or an ``llm_judge``), else the
turn is left unscored (``reward=None``) and the trainer applies its rewards to the completion.
A score function may return ``(None, reason)`` to mark the episode invalid (a judge that failed).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from trainer.envs.base import EpisodeResult, StepResult, row_parts
from trainer.llm.types import Message

ScoreOut = float | None | tuple[float | None, str | None]
ScoreFn = Callable[[dict[str, Any], str], ScoreOut | Awaitable[ScoreOut]]


class SingleTurnEpisode:
    tools = None

    def __init__(self, row: dict[str, Any], score_fn: ScoreFn | None):
        self.messages: list[Message]
        self.messages, self.row = row_parts(row)
        self._score_fn = score_fn
        self.done = False
        self._reward: float | None = None
        self._invalid: str | None = None

    async def step(self, agent_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.done = True
        if self._score_fn is None:
            return StepResult([], None, True)
        out = self._score_fn(self.row, agent_text)
        if inspect.isawaitable(out):
            out = await out
        reward, invalid = out if isinstance(out, tuple) else (out, None)
        self._reward, self._invalid = reward, invalid
        return StepResult([], reward, True, invalid=invalid)

    def result(self) -> EpisodeResult:
        rewards = [] if self._reward is None else [self._reward]
        score = None if self._invalid else self._reward
        return EpisodeResult(score, rewards, 1 if self.done else 0, self._invalid, 0)


class SingleTurnEnvironment:
    name = "single_turn"
    max_turns = 1

    def __init__(self, score_fn: ScoreFn | None = None):
        self.score_fn = score_fn

    def start(self, row: dict[str, Any]) -> SingleTurnEpisode:
        return SingleTurnEpisode(row, self.score_fn)
