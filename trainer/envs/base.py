"""The multi-turn environment contract, its step results, the agent-action parser and episode scores.

An environment turns a dataset row into an episode; the trainer drives the episode::

    episode = env.start(row)                 # cheap, synchronous; episode.messages is the prompt
    await episode.begin()                    # only if it has one: an opening fetched by API (tool domains)
    while not episode.done:
        agent_text = <generate from episode.messages + transcript so far>
        step = await episode.step(agent_text)   # async: API calls of many episodes overlap
        <append agent_text (trained tokens) and step.observation (context tokens)>
        if step.done: break
    result = episode.result()                # score (None when invalid), turn rewards, counts

Rules every environment keeps:

- ``step`` never raises for an API problem: a call that fails after its retries, or a judge reply
  that cannot be parsed, returns ``StepResult(invalid=<reason>, done=True)``; the episode's
  ``result().score`` is then None. The trainer excludes invalid episodes from the loss and counts
  them (``episodes/invalid``); a failure is never turned into a zero reward.
- A malformed agent action (bad tool-call JSON, unknown tool, missing argument, empty reply) gets an
  environment message saying what is wrong, a zero turn reward, and is counted
  (``result().malformed_actions``); the episode goes on until ``max_turns``.
- ``step`` after ``done`` is a programming error (RuntimeError).
- An episode may have ``async begin()``, awaited before its first turn, when its prompt needs an API call
  (``tau2``: the simulated customer's first message). If that fails it sets ``done`` and ``invalid`` (or
  ``user_fault``) and the agent takes no turn.
- A simulated user that misbehaves (breaks role, leaks its goal, stops too early) is not the agent's
  failure: ``result().user_fault`` says why, ``score`` is None, and the trainer excludes the episode and
  counts it apart (``episodes/user_faults``), not as invalid.

Agent actions follow Qwen3's tool-call format, ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``; text without a tool call is a plain message (``Action.kind == "text"``). A
``<think>...</think>`` block is removed before parsing (it is still trained on: the trainer keeps
the raw text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from trainer.errors import UserError
from trainer.llm.parsing import strip_thinking
from trainer.llm.types import Message

ScoreMode = Literal["sum", "mean", "last"]


@dataclass
class StepResult:
    """What one agent turn produced."""

    observation: list[Message]  # appended after the agent's message as context (not trained); [] when done
    reward: float | None  # this turn's reward; None when the turn is not scored (agent ended, invalid)
    done: bool
    invalid: str | None = None  # why the episode cannot be scored; implies done
    # Why the turn scored what it did (the judge's verdict, a malformed action's problem): JSON-serialisable,
    # logged per turn in ``logs/episodes.jsonl`` (``turn_log``), never read by the trainer.
    info: dict[str, Any] = field(default_factory=dict)
    # Who wrote ``observation``: ``user_simulator`` (the simulated user's reply) or ``environment`` (its own
    # text: an error note, a repeated question). The chat-template role alone cannot tell: IntentionGym sends
    # both as ``tool`` messages.
    observation_from: str = "environment"


@dataclass
class EpisodeResult:
    """An episode's outcome once done (or cut off by the trainer)."""

    score: float | None  # aggregated turn rewards; None when invalid
    turn_rewards: list[float]
    turns: int  # agent turns taken
    invalid: str | None
    malformed_actions: int
    info: dict[str, Any] = field(default_factory=dict)
    user_fault: str | None = None  # why the user simulator, not the agent, spoiled it (score None)


@runtime_checkable
class Episode(Protocol):
    messages: list[Message]  # the initial conversation (system + user) the agent answers first
    tools: list[dict[str, Any]] | None  # tool schemas for ``apply_chat_template(tools=...)``, if any
    done: bool

    async def step(self, agent_text: str) -> StepResult: ...

    def result(self) -> EpisodeResult: ...


@runtime_checkable
class Environment(Protocol):
    name: str
    max_turns: int

    def start(self, row: dict[str, Any]) -> Episode:
        """A new episode for ``row``: a row of ``trainer.data.load_dataset`` or a raw dataset record."""
        ...


# ----------------------------------------------------------------------------- scores


def aggregate(turn_rewards: Sequence[float], mode: ScoreMode) -> float:
    """Episode score from turn rewards: ``sum``, ``mean`` or ``last``; 0.0 when no turn was scored."""
    if not turn_rewards:
        return 0.0
    if mode == "sum":
        return float(sum(turn_rewards))
    if mode == "mean":
        return float(sum(turn_rewards) / len(turn_rewards))
    if mode == "last":
        return float(turn_rewards[-1])
    raise ValueError(f"unknown score mode {mode!r}; expected sum, mean or last")


def excerpt(text: str, limit: int = 300) -> str:
    """The start of a model's raw reply for logs: enough to see why a verdict parsed or did not."""
    return text if len(text) <= limit else text[:limit] + "..."


def row_parts(row: dict[str, Any]) -> tuple[list[Message], dict[str, Any]]:
    """``(prompt messages, original record)`` of a loader row (``{"prompt", "row"}``) or a raw record."""
    original = row["row"] if isinstance(row.get("row"), dict) else row
    prompt = row.get("prompt", original.get("prompt"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], original
    if prompt is None:
        raise ValueError("the row has no prompt")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt], original


# ----------------------------------------------------------------------------- actions


@dataclass
class Action:
    kind: Literal["tool_call", "text", "malformed"]
    text: str  # the reply without its think block
    name: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why it is malformed


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_action(text: str) -> Action:
    """Parse one agent reply: a single Qwen3-style tool call, plain text, or malformed (with the reason)."""
    body = strip_thinking(text)
    calls = _TOOL_CALL.findall(body)
    if not calls:
        if "<tool_call>" in body or "</tool_call>" in body:
            return Action("malformed", body, error="unbalanced <tool_call> tags")
        if not body:
            return Action("malformed", body, error="empty reply")
        return Action("text", body)
    if len(calls) > 1:
        return Action("malformed", body, error=f"one tool call per turn, got {len(calls)}")
    try:
        call = json.loads(calls[0].strip())
    except json.JSONDecodeError as e:
        return Action(
            "malformed", body, error=f"the tool call is not valid JSON ({e.msg} at column {e.colno})"
        )
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Action("malformed", body, error='the tool call needs {"name": <string>, "arguments": {...}}')
    args = call.get("arguments", {})
    if isinstance(args, str):
        # Some models emit the arguments as a JSON string, as OpenAI's API does.
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return Action(
                "malformed", body, name=call["name"], error="the tool call's arguments are not a JSON object"
            )
    if not isinstance(args, dict):
        return Action(
            "malformed", body, name=call["name"], error="the tool call's arguments are not a JSON object"
        )
    return Action("tool_call", body, name=call["name"], arguments=args)


def index_by_id(raw: Any, parse: Callable[[Any], Any], source: str, what: str, hint: str) -> dict[str, Any]:
    """``{entry.id: entry}`` of a JSON list of task-like entries (IntentionGym's intentions, tau2's tasks), each
    read by ``parse``; every malformed or repeated entry is reported with its index, all in one error."""
    if not isinstance(raw, list):
        raise UserError(source, f"expected a list of tasks, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    problems = []
    for i, entry in enumerate(raw):
        try:
            item = parse(entry)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{what} {i}: {e}")
            continue
        if item.id in out:
            problems.append(f"{what} {i}: duplicate id {item.id!r}")
        out[item.id] = item
    if problems:
        raise UserError(source, problems[:20], hint=hint)
    return out
