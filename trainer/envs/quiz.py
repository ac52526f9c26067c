"""``quiz``: the row's question asked ``max_turns`` times; each reply is scored on its own. No API, deterministic.

A turn's reward is 1.0 when the reply (stripped, lower-cased, think block removed) equals the row's
``answer``, else 0.0; the user then asks again (the observation is the row's prompt), until
``environment.max_turns`` turns. The episode's score aggregates the turn rewards (``environment.score``).

It exists to check credit assignment: every turn carries its own verifiable reward, so an episode with
a right first reply and wrong later ones shows whether the trainer credits each turn with its own
result (``algorithm.advantage: turn``) or blurs them into one episode number (``episode``).
"""

from __future__ import annotations

from typing import Any

from trainer.envs.base import EpisodeResult, ScoreMode, StepResult, aggregate, row_parts
from trainer.llm.parsing import strip_thinking
from trainer.llm.types import Message


def _norm(text: str) -> str:
    return strip_thinking(text).strip().lower()


class QuizEpisode:
    tools = None

    def __init__(self, row: dict[str, Any], max_turns: int, mode: ScoreMode):
        self.messages: list[Message]
        self.messages, original = row_parts(row)
        answer = row.get("answer", original.get("answer"))
        if answer is None:
            raise ValueError("a quiz row needs an answer")
        self.answer = _norm(str(answer))
        self.max_turns = max_turns
        self.mode = mode
        self.turn_rewards: list[float] = []
        self.done = False

    async def step(self, agent_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        reward = 1.0 if _norm(agent_text) == self.answer else 0.0
        self.turn_rewards.append(reward)
        self.done = len(self.turn_rewards) >= self.max_turns
        # The question again (the first user message), as the next turn's context.
        observation = [] if self.done else [m for m in self.messages if m["role"] == "user"][-1:]
        return StepResult(observation, reward, self.done, info={"expected": self.answer})

    def result(self) -> EpisodeResult:
        score = aggregate(self.turn_rewards, self.mode)
        return EpisodeResult(score, list(self.turn_rewards), len(self.turn_rewards), None, 0)


class QuizEnvironment:
    name = "quiz"

    def __init__(self, max_turns: int, mode: ScoreMode = "mean"):
        self.max_turns = max_turns
        self.mode = mode

    def start(self, row: dict[str, Any]) -> QuizEpisode:
        return QuizEpisode(row, self.max_turns, self.mode)
