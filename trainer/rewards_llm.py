"""The ``llm_judge`` reward: a rubric prompt to the ``judge`` LLM, a strict JSON score, normalised to [0, 1].

Configured as ``rewards: [{type: llm_judge, rubric: "...", min_score: 0, max_score: 10, weight: 0.5}]``
(``weight`` is the seeds' ``reward_coefficient``; the trainer multiplies, as for every reward). The
rubric's placeholders ``{conversation}``, ``{prompt}``, ``{completion}`` and ``{answer}`` are filled
by plain replacement, so a rubric may show JSON examples with braces.

The judge must reply with exactly ``{"score": <number>}`` (optionally in one code fence) with the
number within ``[min_score, max_score]``. Anything else, or a call that fails after its retries,
gives ``JudgeScore(value=None, invalid=<reason>)``: the episode is invalid and excluded from the
loss, never scored 0 (seed 001's "fallback score" is exactly what we must not do).

    judge = LlmJudge(reward_cfg, judge_client)
    s = await judge.score(messages=episode_messages, answer=row_answer)
    if s.invalid: mark the episode invalid
    else: reward += reward_cfg.weight * s.value

``JudgeScore.record()`` (parsed score, normalised value, reason if invalid, the raw reply's first 300
characters) is what ``logs/episodes.jsonl`` shows of each verdict, so a rubric that the judge misreads shows up
in the conversations before it shows up in the reward curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.config.multiturn import LlmJudgeReward
from trainer.envs.base import excerpt
from trainer.llm.parsing import json_object, strip_thinking
from trainer.llm.types import LLMClient, Message

JUDGE_SYSTEM = (
    "You are a strict evaluator. Score the assistant's work according to the rubric. Reply with one JSON object "
    'and nothing else: {{"score": <number from {lo:g} to {hi:g}>}}.'
)


@dataclass
class JudgeScore:
    value: float | None  # normalised to [0, 1]; None when invalid
    raw: float | None = None  # the judge's number on its own scale
    invalid: str | None = None
    reply: str = ""  # the judge's raw reply, cut at 300 characters: why it scored (or did not parse) so

    def record(self) -> dict[str, float | str | None]:
        """This verdict as ``logs/episodes.jsonl`` shows it under ``judges.<reward name>``."""
        return {"score": self.raw, "value": self.value, "invalid": self.invalid, "reply": self.reply}


def parse_score(text: str, lo: float, hi: float) -> float:
    """The number of ``{"score": x}``; raises ValueError unless it is exactly that, finite, within [lo, hi]."""
    obj = json_object(text)
    if set(obj) != {"score"}:
        raise ValueError(f'expected exactly the key "score", got {sorted(obj)}')
    x = obj["score"]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f'"score" must be a number, got {x!r}')
    if not lo <= x <= hi:
        raise ValueError(f'"score" {x} is outside [{lo:g}, {hi:g}]')
    return float(x)


def normalise(x: float, lo: float, hi: float) -> float:
    return (x - lo) / (hi - lo)


def transcript(messages: Sequence[Message]) -> str:
    """The conversation as ``role: content`` blocks, think blocks removed (the judge scores what was said)."""
    return "\n\n".join(f"{m['role']}: {strip_thinking(m['content'])}" for m in messages)


class LlmJudge:
    def __init__(self, cfg: LlmJudgeReward, client: LLMClient):
        self.cfg = cfg
        self.client = client

    def build_messages(self, messages: Sequence[Message], answer: str | None = None) -> list[Message]:
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        last_agent = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        rubric = self.cfg.rubric
        for name, value in (
            ("{conversation}", transcript(messages)),
            ("{prompt}", first_user),
            ("{completion}", strip_thinking(last_agent)),
            ("{answer}", answer or ""),
        ):
            rubric = rubric.replace(name, value)
        system = JUDGE_SYSTEM.format(lo=self.cfg.min_score, hi=self.cfg.max_score)
        return [{"role": "system", "content": system}, {"role": "user", "content": rubric}]

    async def score(self, messages: Sequence[Message], answer: str | None = None) -> JudgeScore:
        """Score one episode (its full message list, agent turns included)."""
        lo, hi = self.cfg.min_score, self.cfg.max_score
        res = await self.client.complete(
            self.build_messages(messages, answer), parse=lambda t: parse_score(t, lo, hi)
        )
        reply = excerpt(res.text)
        if not res.ok:
            return JudgeScore(None, None, res.error or "judge failed", reply)
        return JudgeScore(normalise(res.value, lo, hi), res.value, reply=reply)
