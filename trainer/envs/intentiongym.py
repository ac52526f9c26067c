"""IntentionGym (UserRL): the agent asks clarifying questions until it knows what a vague task means.

Data (CONTEXT §2): verl-format Parquet rows whose ``reward_model.id`` names a task in the intention
JSON (``environment.intentions``), where each task lists its ``missing_details`` with an importance
of "1", "2" or "3". ``load_intentions`` reads the JSON; ``check_rows`` fails early, naming the id and
the file, when a row has no task.

One turn: the agent calls ``interact_with_env`` with ``{"content": <question>}``. The simulated user
(``user_simulator``) answers in character and the coverage judge decides which of the details not yet
covered the question asked about. Both calls start together, so a turn costs one round trip of
latency; on the last turn (``max_turns``) the user's answer would never be read, so it is not asked.

Turn reward (``turn_reward``): 1.0 / 0.7 / 0.4 for the highest importance (3 / 2 / 1) newly covered,
minus 0.2 per extra detail covered by the same question, clipped to [0, 1]; 0 when nothing new is
covered. The episode ends when every detail is covered or after ``max_turns``; its score is the
``mean`` (upstream), ``sum`` or ``last`` of the turn rewards. A reply without a tool call ends the
episode without scoring that turn (as verl's tool-agent loop does), unless ``environment.text_action``
is ``ask``: then the reply itself is the question; a malformed call is answered with an error message
and scores 0.

Judges (``environment.judge_backend``):

- ``api``: the ``judge`` LLM replies ``{"covered": [...]}``; a reply that does not parse strictly, or
  a call that fails after its retries, makes the episode invalid (excluded from the loss), never 0.
- ``rule``: ``rule_covered`` matches words deterministically (no API; smoke tests and baselines).

``merged: true`` asks the user simulator for its answer and the verdict in one call
(``{"reply": ..., "covered": [...]}``). Trade-off: half the round trips and one prompt instead of
two (cheaper, faster on a slow relay); but the reply is written by a model that is also judging (it
tends to reveal more, and a sampled verdict is noisier than a greedy one), one parse failure loses
both, verdicts cannot be cached (the call samples), and judge and user cannot be different models.
Upstream made two sequential calls per turn; the default here makes two concurrent ones.

Each turn's ``StepResult.info`` says why it scored what it did (``logs/episodes.jsonl``'s ``turn_log``):
``question``, ``covered`` (descriptions of the details it newly covered), ``remaining``, ``judge``
(``{"backend": "rule", "matched": {description: evidence}}``, or ``{"backend": "api" | "merged",
"reply": <the raw reply, cut at 300 characters>}``) and, for the rule judge, ``already_covered`` (details an
earlier turn covered that this question named again: the usual reason for a 0); a malformed action has
``malformed`` (the problem), an invalid turn ``question`` and ``judge``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config.multiturn import EnvironmentConfig
from trainer.envs.base import (
    EpisodeResult,
    StepResult,
    aggregate,
    excerpt,
    index_by_id,
    parse_action,
    row_parts,
)
from trainer.envs.intentiongym_prompts import (
    judge_messages,
    merged_messages,
    parse_merged,
    parse_reply,
    parse_verdict,
    user_messages,
)
from trainer.errors import UserError
from trainer.llm.types import CallResult, LLMClient, Message

IMPORTANCE_REWARD = {3: 1.0, 2: 0.7, 1: 0.4}
EXTRA_DETAIL_PENALTY = 0.2
# The user's reply is the result of the agent's interact_with_env call (UserRL's protocol), so it goes back as a
# tool message; also with text_action: ask, so the model sees one format however it asked. Qwen3's template
# renders it as <tool_response> inside a user turn; episodes.jsonl records the rendering the model got.
OBSERVATION_ROLE = "tool"

TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "interact_with_env",
        "description": "Ask the user one clarifying question about the task.",
        "parameters": {
            "type": "object",
            "properties": {"content": {"type": "string", "description": "Your question to the user."}},
            "required": ["content"],
        },
    },
}


@dataclass(frozen=True)
class Detail:
    description: str
    importance: int  # 1, 2 or 3
    inquiry: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Intention:
    id: str
    category: str
    task: str
    details: tuple[Detail, ...] = field(default_factory=tuple)


def turn_reward(importances: Sequence[int]) -> float:
    """Reward of one question that newly covered details of these importances (see the module doc)."""
    if not importances:
        return 0.0
    reward = IMPORTANCE_REWARD[max(importances)] - EXTRA_DETAIL_PENALTY * (len(importances) - 1)
    return round(min(1.0, max(0.0, reward)), 6)  # rounded: 0.7 - 0.2 is 0.49999999999999994 otherwise


# ----------------------------------------------------------------------------- data


def load_intentions(path: str | Path) -> dict[str, Intention]:
    """The intention JSON as ``{id: Intention}``; every malformed entry is reported with its index."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            str(path), "intention file not found", hint="set environment.intentions to the JSON's path"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(str(path), f"invalid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    return index_by_id(
        raw, _intention, str(path), "entry", "each entry needs id, category, task, missing_details"
    )


def _intention(entry: Any) -> Intention:
    if not isinstance(entry, dict):
        raise TypeError(f"expected an object, got {type(entry).__name__}")
    ident, task = str(entry["id"]), str(entry["task"])
    details = []
    for j, d in enumerate(entry["missing_details"]):
        importance = str(d["importance"])
        if importance not in ("1", "2", "3"):
            raise ValueError(
                f"missing_details[{j}].importance is {d['importance']!r}; allowed: '1', '2', '3'"
            )
        options = d.get("options") or []
        if not isinstance(options, list):
            raise TypeError(f"missing_details[{j}].options must be a list")
        details.append(
            Detail(
                str(d["description"]),
                int(importance),
                str(d.get("inquiry", "")),
                tuple(str(o) for o in options),
            )
        )
    if not details:
        raise ValueError("missing_details is empty")
    return Intention(ident, str(entry.get("category", "")), task, tuple(details))


def row_id(row: dict[str, Any]) -> str:
    """``reward_model.id`` of a loader row or a raw Parquet record."""
    original = row["row"] if isinstance(row.get("row"), dict) else row
    rm = original.get("reward_model")
    if not isinstance(rm, dict) or "id" not in rm:
        raise KeyError("reward_model.id")
    return str(rm["id"])


def check_rows(
    rows: Sequence[dict[str, Any]], intentions: dict[str, Intention], source: str, intentions_path: str
) -> None:
    """Fail before training when a row's ``reward_model.id`` is not in the intention JSON."""
    missing, no_id = [], []
    for i, row in enumerate(rows):
        try:
            rid = row_id(row)
        except KeyError:
            no_id.append(i)
            continue
        if rid not in intentions:
            missing.append(rid)
    problems = [f"row {i}: no reward_model.id" for i in no_id[:5]]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        problems.append(f"reward_model.id {shown} not found in {intentions_path}")
    if problems:
        raise UserError(
            source, problems, hint="point environment.intentions at the JSON of the same split as the data"
        )


# ----------------------------------------------------------------------------- rule judge

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = (
    "a an the and or of to for in on at by with from is are was be do does did you your yours i me my we our "
    "it its this that these those what which who whom how when where why would will could should can may "
    "like prefer preferred want any some have has had there their them they about as if so not no yes please tell "
    "know let us more most much many kind type sort"
)
_STOP = frozenset(_STOP_WORDS.split(" "))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def keywords(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


def rule_covered(question: str, details: Sequence[Detail], threshold: float = 0.5) -> list[int]:
    """Indices of ``details`` the question covers: it names one of a detail's options, or contains at least
    ``threshold`` of the distinctive keywords of its inquiry or of its description. Keywords shared by
    several of the given details ("travel" in "Travel dates" and "Travel companions") do not count, as
    they cannot tell the details apart (a detail left with no distinctive keyword is matched by its options). Deterministic and crude on purpose: smoke tests and baselines.
    """
    return list(rule_matches(question, details, threshold))


def rule_matches(question: str, details: Sequence[Detail], threshold: float = 0.5) -> dict[int, str]:
    """``rule_covered`` with the evidence: ``{index: why}``, e.g. ``"option 'b'"`` or
    ``"inquiry keywords ['budget'] of ['budget', 'trip']"``, for the per-turn verdicts in episodes.jsonl."""
    q = keywords(question)
    sets = [(keywords(d.inquiry), keywords(d.description)) for d in details]
    seen: dict[str, int] = {}
    for inquiry, description in sets:
        for word in inquiry | description:
            seen[word] = seen.get(word, 0) + 1
    shared = {w for w, n in seen.items() if n > 1}
    matches: dict[int, str] = {}
    for i, (d, (inquiry, description)) in enumerate(zip(details, sets, strict=True)):
        why = [f"option {o!r}" for o in d.options if (k := keywords(o)) and k <= q]
        for label, k in (("inquiry", inquiry), ("description", description)):
            k = k - shared
            if k and len(k & q) / len(k) >= threshold:
                why.append(f"{label} keywords {sorted(k & q)} of {sorted(k)}")
        if why:
            matches[i] = "; ".join(why)
    return matches


# ----------------------------------------------------------------------------- episodes


class IntentionEpisode:
    """One task's conversation; see the module doc for the turn rules."""

    def __init__(self, env: IntentionGym, intention: Intention, messages: list[Message]):
        self.env = env
        self.intention = intention
        self.messages = messages
        self.tools = [TOOL_SCHEMA]
        self.done = False
        self.remaining: list[Detail] = list(intention.details)
        self.covered: list[Detail] = []  # in the order the questions covered them
        self.turn_rewards: list[float] = []
        self.turns = 0
        self.malformed = 0
        self.invalid: str | None = None
        self.transcript: list[tuple[str, str]] = []  # (question, user's reply)

    async def step(self, agent_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.turns += 1
        last = self.turns >= self.env.max_turns
        action = parse_action(agent_text)
        tool = self.env.cfg.tool_name
        problem = action.error
        if action.kind == "tool_call" and action.name != tool:
            problem = f"unknown tool {action.name!r}; the only tool is {tool}"
        elif action.kind == "tool_call" and not str(action.arguments.get("content", "")).strip():
            problem = f'{tool} needs a non-empty "content" argument: your question'
        if action.kind == "text":
            if self.env.cfg.text_action == "ask":
                return await self._ask(action.text, last)
            self.done = True
            return StepResult([], None, True, info={"ended_by_agent": True})
        if problem is not None:
            self.malformed += 1
            self.turn_rewards.append(0.0)
            self.done = last
            note = f'Invalid action: {problem}. Call {tool} with {{"content": "<one question>"}}.'
            obs = [] if last else [{"role": OBSERVATION_ROLE, "content": note}]
            return StepResult(obs, 0.0, last, info={"malformed": problem})
        return await self._ask(str(action.arguments["content"]).strip(), last)

    async def _ask(self, question: str, last: bool) -> StepResult:
        env, it = self.env, self.intention
        reply: str | None = None
        if env.cfg.merged:
            msgs = merged_messages(it.task, it.details, self.remaining, self.transcript, question)
            k = len(self.remaining)
            res = await env.user.complete(msgs, parse=lambda t: parse_merged(t, k))
            verdict: dict[str, Any] = {"backend": "merged", "reply": excerpt(res.text)}
            if not res.ok:
                return self._invalid(res.error or "user simulator failed", question, verdict)
            reply, covered = res.value
        else:
            reply_res, (covered, judge_error, verdict) = await asyncio.gather(
                self._user_reply(question, last), self._judge(question)
            )
            if reply_res is not None and not reply_res.ok:
                return self._invalid(reply_res.error or "user simulator failed", question, verdict)
            if judge_error is not None:
                return self._invalid(judge_error, question, verdict)
            reply = reply_res.value if reply_res is not None else None
        newly = [self.remaining[i] for i in covered]
        reward = turn_reward([d.importance for d in newly])
        info: dict[str, Any] = {"question": question, "covered": [d.description for d in newly]}
        if env.cfg.judge_backend == "rule" and not env.cfg.merged:
            # Why a question scored 0 although it named a detail: that detail was covered by an earlier turn.
            again = rule_matches(question, self.covered, env.cfg.rule_threshold)
            info["already_covered"] = [self.covered[i].description for i in again]
        self.turn_rewards.append(reward)
        self.covered += newly
        self.remaining = [d for i, d in enumerate(self.remaining) if i not in set(covered)]
        self.transcript.append((question, reply or ""))
        self.done = last or not self.remaining
        obs = [] if self.done or reply is None else [{"role": OBSERVATION_ROLE, "content": reply}]
        info.update(remaining=len(self.remaining), judge=verdict)
        return StepResult(obs, reward, self.done, info=info, observation_from="user_simulator")

    async def _user_reply(self, question: str, last: bool) -> CallResult | None:
        if last:
            return None
        it = self.intention
        return await self.env.user.complete(
            user_messages(it.task, it.details, self.transcript, question), parse=parse_reply
        )

    async def _judge(self, question: str) -> tuple[list[int], str | None, dict[str, Any]]:
        """``(covered indices into remaining, error, verdict)``; the verdict is what episodes.jsonl shows of it:
        the rule judge's evidence per detail, the API judge's raw reply."""
        env = self.env
        if env.cfg.judge_backend == "rule":
            matches = rule_matches(question, self.remaining, env.cfg.rule_threshold)
            named = {self.remaining[i].description: why for i, why in matches.items()}
            return list(matches), None, {"backend": "rule", "matched": named}
        assert env.judge is not None
        k = len(self.remaining)
        res = await env.judge.complete(
            judge_messages(self.intention.task, self.remaining, question), parse=lambda t: parse_verdict(t, k)
        )
        verdict = {"backend": "api", "reply": excerpt(res.text)}
        return (res.value, None, verdict) if res.ok else ([], res.error or "judge failed", verdict)

    def _invalid(self, reason: str, question: str, verdict: dict[str, Any]) -> StepResult:
        self.invalid = reason
        self.done = True
        return StepResult([], None, True, invalid=reason, info={"question": question, "judge": verdict})

    def result(self) -> EpisodeResult:
        score = None if self.invalid else aggregate(self.turn_rewards, self.env.cfg.score)
        info = {
            "id": self.intention.id,
            "covered": len(self.intention.details) - len(self.remaining),
            "details": len(self.intention.details),
        }
        return EpisodeResult(score, list(self.turn_rewards), self.turns, self.invalid, self.malformed, info)


class IntentionGym:
    """``Environment`` for ``environment.name: intentiongym``.

    ``user`` answers as the user; ``judge`` is needed only for ``judge_backend: api`` without ``merged``.
    """

    name = "intentiongym"

    def __init__(
        self,
        cfg: EnvironmentConfig,
        intentions: dict[str, Intention],
        user: LLMClient,
        judge: LLMClient | None = None,
        intentions_path: str = "",
    ):
        if cfg.judge_backend == "api" and not cfg.merged and judge is None:
            raise ValueError("judge_backend: api needs a judge client")
        self.cfg = cfg
        self.max_turns = cfg.max_turns
        self.intentions = intentions
        self.user = user
        self.judge = judge
        self.intentions_path = intentions_path or (cfg.intentions or "")

    @classmethod
    def from_config(
        cls, cfg: EnvironmentConfig, user: LLMClient, judge: LLMClient | None = None, split: str = "train"
    ) -> IntentionGym:
        path = cfg.val_intentions if split == "val" and cfg.val_intentions else cfg.intentions
        assert path is not None  # the config validator requires it for intentiongym
        return cls(cfg, load_intentions(path), user, judge, intentions_path=path)

    def check_rows(self, rows: Sequence[dict[str, Any]], source: str) -> None:
        check_rows(rows, self.intentions, source, self.intentions_path)

    def start(self, row: dict[str, Any]) -> IntentionEpisode:
        messages, _ = row_parts(row)
        rid = row_id(row)
        if rid not in self.intentions:
            raise UserError(
                self.intentions_path,
                f"reward_model.id {rid!r} not found",
                hint="check environment.intentions",
            )
        return IntentionEpisode(self, self.intentions[rid], messages)
