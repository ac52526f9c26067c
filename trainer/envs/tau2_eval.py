"""tau2-bench's reward for one finished episode, re-implemented from its evaluators (no tau2 import).

The reward is the product of the components in the task's ``reward_basis`` (default ``DB`` and
``COMMUNICATE``; ``src/tau2/evaluator/evaluator.py``, evaluation type ``all``):

- ``DB`` (``evaluator_env.py``): the gold actions are replayed on a fresh copy of the task's initial DB;
  the episode's final DB must have the same hash (``toolkit.db_hash``: sha256 of the sorted JSON dump).
  A gold action of a mutating tool that raises leaves the gold state incomplete: tau2 then reports the DB
  check as not evaluated (a match is not certified, the component drops out of the product; a mismatch
  stays 0). A read-only gold action that raises cannot move the DB and is ignored.
- ``ENV_ASSERTION``: each assertion function called on the final tool instance returns its ``assert_value``.
- ``COMMUNICATE`` (``evaluator_communicate.py``): each ``communicate_info`` string occurs, lower-cased, in
  one of the agent's text messages, lower-cased with commas removed.
- ``ACTION`` (``evaluator_action.py``, v1.0 rule): every gold action is matched by one of the agent's tool
  calls: same name, and equal arguments over ``compare_args`` (unset: the call's own argument names).
- ``NL_ASSERTION`` (``evaluator_nl_assertions.py``): the ``judge`` LLM grades each natural-language
  assertion on the transcript; all must be met. Also applied outside the reward basis with
  ``environment.nl_judge`` (tau2's ``all_with_nl_assertions``). A judge call that fails or a reply that does
  not parse strictly makes the episode invalid, never 0.

tau2 scores 0 an episode that did not end by the user's or the agent's stop (too many errors, out of
steps); here: ``environment.max_turns`` or ``max_tool_errors`` reached, or cut by ``max_episode_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer.envs.tau2_format import Action, Task
from trainer.envs.toolkit import ToolBox, Toolkit, deep_merge
from trainer.llm.parsing import json_object
from trainer.llm.types import Message


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class GoldState:
    # None: a mutating gold action failed, so the DB check is not evaluated (tau2's db_check None)
    hash: str | None
    failed: tuple[str, ...] = ()  # "action_id (name): error" of each gold action that raised


# ----------------------------------------------------------------------------- initial and gold states


def initial_db(kit: Toolkit, base_db: Any, task: Task) -> Any:
    """The DB a task's episodes start from: ``initialization_data.agent_data`` merged in, then its
    ``initialization_actions`` run (tau2's ``Environment.set_state``). Returns ``base_db`` itself when the task
    changes nothing, so tasks without an initial state share one DB (episodes copy it on their first write)."""
    if not task.agent_data and not task.initialization_actions:
        return base_db
    db = deep_merge(base_db, task.agent_data) if task.agent_data else base_db
    box = kit.open(db)
    for a in task.initialization_actions:
        box.call_function(a.func_name, a.arguments)
    return box.db


def gold_state(kit: Toolkit, start_db: Any, task: Task) -> GoldState:
    """Replay the task's gold actions on a copy of ``start_db`` (``replay_golden_actions``)."""
    box = kit.open(start_db)
    failed = []
    incomplete = False
    for a in task.criteria.actions if task.criteria else ():
        _, error = box.call(a.name, a.arguments)
        if error is not None:
            failed.append(f"{a.action_id} ({a.name}): {error}")
            spec = kit.specs.get(a.name)
            incomplete = incomplete or spec is None or spec.mutates
    return GoldState(None if incomplete else box.db_hash(), tuple(failed))


# ----------------------------------------------------------------------------- components


def _normalize(value: Any) -> Any:
    """tau2's ``_normalize_action_arg_value``: JSON-looking strings compare as the JSON they hold."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith(("{", "[")):
            try:
                return _normalize(json.loads(stripped))
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def action_matches(action: Action, call: ToolCall) -> bool:
    """tau2's ``Action.compare_with_tool_call``."""
    if action.name != call.name:
        return False
    keys = list(call.arguments) if action.compare_args is None else list(action.compare_args)
    if not keys:
        return True
    got = {k: _normalize(v) for k, v in call.arguments.items() if k in keys}
    want = {k: _normalize(v) for k, v in action.arguments.items() if k in keys}
    return got == want


def matched_actions(gold: Sequence[Action], calls: Sequence[ToolCall]) -> list[bool]:
    return [any(action_matches(a, c) for c in calls) for a in gold]


def communicated(info: Sequence[str], agent_texts: Sequence[str]) -> list[bool]:
    """tau2's substring check: ``info.lower() in message.lower().replace(",", "")`` for some agent message."""
    texts = [t.lower().replace(",", "") for t in agent_texts]
    return [any(i.lower() in t for t in texts) for i in info]


def env_assertions_met(box: ToolBox, task: Task) -> list[bool]:
    out = []
    for a in task.criteria.env_assertions if task.criteria else ():
        try:
            value = box.call_function(a.func_name, a.arguments)
        except Exception:  # tau2 grades an evaluation that raises as 0
            value = None
        out.append(isinstance(value, bool) and value == a.assert_value)
    return out


@dataclass
class Verdict:
    """The components of one episode's reward and the reward they make."""

    reward: float
    breakdown: dict[str, float] = field(default_factory=dict)  # component -> 0/1 for those in the basis
    checks: dict[str, Any] = field(default_factory=dict)  # what each check found (episodes.jsonl)


def combine(task: Task, db_match: bool | None, assertions: list[bool], communicate: list[bool],
            actions: list[bool], nl: list[bool] | None) -> Verdict:  # fmt: skip
    """Multiply the components of ``task``'s reward basis (and the NL verdict, when there is one). ``db_match``
    None: not evaluated (drops out); ``nl`` None: not judged (only allowed when NL_ASSERTION is not in the basis)."""
    c = task.criteria
    if c is None:
        return Verdict(1.0, {}, {"note": "no evaluation criteria"})
    parts = {
        "DB": None if db_match is None else float(db_match),
        "ENV_ASSERTION": float(all(assertions)),
        "COMMUNICATE": float(all(communicate)),
        "ACTION": float(all(actions)),
        "NL_ASSERTION": None if nl is None else float(all(nl)),
    }
    # A verdict of the NL judge counts also outside the basis: it is only asked for with nl_judge (tau2's
    # all_with_nl_assertions) or when the basis lists it.
    keys = [
        *c.reward_basis,
        *(["NL_ASSERTION"] if nl is not None and "NL_ASSERTION" not in c.reward_basis else []),
    ]
    breakdown = {k: v for k in keys if (v := parts[k]) is not None}
    reward = 1.0
    for v in breakdown.values():
        reward *= v
    checks: dict[str, Any] = {"db_match": db_match, "communicate": dict(zip(c.communicate_info, communicate, strict=True)),
                              "actions": dict(zip((a.action_id for a in c.actions), actions, strict=True))}  # fmt: skip
    if assertions:
        checks["env_assertions"] = assertions
    if nl is not None:
        checks["nl_assertions"] = dict(zip(c.nl_assertions, nl, strict=True))
    return Verdict(reward, breakdown, checks)


# ----------------------------------------------------------------------------- the NL-assertion judge

NL_SYSTEM = (
    "You grade a conversation between a customer service agent and a customer against a list of expected "
    "outcomes. Grade each expected outcome on its own: is it satisfied by what the agent did and said?\n"
    "Reply with one JSON object and nothing else:\n"
    '{"results": [{"expectedOutcome": "<the outcome, as given>", "reasoning": "<short reason>", '
    '"metExpectation": true or false}, ...]}\n'
    "with exactly one entry per expected outcome, in the order given."
)


def nl_messages(transcript: Sequence[Message], assertions: Sequence[str]) -> list[Message]:
    """The judge's prompt: the conversation as ``role: content`` lines and the outcomes, as tau2 builds it."""
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in transcript)
    outcomes = "\n".join(f"{i}. {a}" for i, a in enumerate(assertions, 1))
    user = f"conversation:\n{conversation}\n\nexpectedOutcomes:\n{outcomes}"
    return [{"role": "system", "content": NL_SYSTEM}, {"role": "user", "content": user}]


def parse_nl(text: str, k: int) -> list[bool]:
    """``metExpectation`` of each of the ``k`` outcomes; ``ValueError`` unless the reply is exactly that shape."""
    obj = json_object(text)
    results = obj.get("results")
    if set(obj) != {"results"} or not isinstance(results, list):
        raise ValueError('expected exactly {"results": [...]}')
    if len(results) != k:
        raise ValueError(f'"results" has {len(results)} entries for {k} expected outcomes')
    met = []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("metExpectation"), bool):
            raise ValueError(f"results[{i}].metExpectation must be true or false")
        met.append(r["metExpectation"])
    return met
