"""``tau2``: tool-using customer-service domains in tau2-bench's format (airline, retail, or your own).

The agent talks to a simulated customer and calls the domain's tools, which read and change the
episode's own copy of the domain DB; the episode is graded as tau2-bench grades it. Parts:

- ``tau2_format``: the domain directory (``db.json``, ``policy.md``, ``tasks.json``, ``split_tasks.json``)
  and its tasks; ``toolkit``: the tool class (``environment.tools``, tau2's own or ours), schemas, calls,
  DB hashes; ``tau2_user``: the simulated customer's prompt, stop tokens and fault checks;
  ``tau2_eval``: the reward (DB hash match, communicated info, assertions, optional NL judge).

An episode (tau2's half-duplex ``Orchestrator``): the prompt is the system message (an agent instruction
and the domain policy, as tau2's ``LLMAgent`` writes it), tau2's fixed opening "Hi! How can I help you
today?" as the agent's first message, and the customer's first message, which ``begin()`` fetches from
the user simulator. Then each agent turn is one of

- a tool call (Qwen3's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the tools' JSON
  schemas declared to the chat template): it runs against the DB and its result (or ``Error: ...``) comes
  back as a ``tool`` message. Failed calls are counted (``tool_errors``), never raised; a reply whose
  tool call does not parse gets an error note and counts as a malformed action;
- a text message to the customer, who answers as a ``user`` message or ends the episode with ``###STOP###``
  or ``###TRANSFER###``; the agent may end it with ``###STOP###`` in its message.

The episode is graded when the customer or the agent ends it (``tau2_eval``), on that last turn; it scores 0
when it ran out of turns (``max_turns``), reached ``max_tool_errors`` or was cut at ``max_episode_tokens``, as
tau2 scores a run that ended prematurely. ``partial_reward`` adds a shaping reward on the turn it is earned.
The episode's score is the sum of its turn rewards (``environment.score: sum``).

Infrastructure failures stay apart from policy failures: a user-simulator or judge call that fails after
its retries makes the episode invalid (``episodes/invalid``); a simulator that breaks role, leaks its
instructions, stops too early or says ``###OUT-OF-SCOPE###`` is a user fault (``episodes/user_faults``).
Either way the episode is excluded from the loss, never scored 0.

``StepResult.info`` per turn (episodes.jsonl's ``turn_log``): ``tool``, ``arguments``, ``error`` of a tool
call; ``message`` and ``user`` (the reply) of a text turn; ``malformed``; ``user_fault``; at the end
``termination`` (``user_stop``, ``agent_stop``, ``max_turns``, ``too_many_errors``), ``reward`` (tau2's),
``breakdown`` and ``checks``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer.config.multiturn import EnvironmentConfig
from trainer.envs.base import EpisodeResult, StepResult, excerpt, parse_action
from trainer.envs.tau2_eval import (
    GoldState,
    ToolCall,
    Verdict,
    combine,
    communicated,
    env_assertions_met,
    gold_state,
    initial_db,
    matched_actions,
    nl_messages,
    parse_nl,
)
from trainer.envs.tau2_format import Domain, Task, load_domain, resolve_dir, row_task_id, unsupported
from trainer.envs.tau2_user import (
    FIRST_AGENT_MESSAGE,
    OUT_OF_SCOPE,
    STOP,
    TRANSFER,
    asks_confirmation,
    goal_leak,
    load_guidelines,
    parse_reply,
    premature_stop,
    role_break,
    simulator_messages,
    stop_token,
    system_prompt,
)
from trainer.envs.toolkit import Toolkit, build_db, db_hash, import_ref, read_db
from trainer.errors import UserError
from trainer.llm.types import LLMClient, Message

AGENT_INSTRUCTION = (
    "You are a customer service agent. Help the user as the <policy> below allows.\n"
    "In each turn do exactly one of two things: send the user a message, or make one tool call.\n"
    "Always follow the policy."
)


def agent_system_prompt(policy: str, tool_list: str | None = None) -> str:
    """tau2's ``LLMAgent`` system prompt layout: ``<instructions>`` then ``<policy>``."""
    tools = f"\n<tools>\nCall a tool by replying with its name: {tool_list}\n</tools>" if tool_list else ""
    return (
        f"<instructions>\n{AGENT_INSTRUCTION}\n</instructions>\n<policy>\n{policy.strip()}\n</policy>{tools}"
    )


@dataclass
class Loaded:
    """A domain as a run uses it: shared by the train and val environments and ``check_data`` of one process."""

    domain: Domain
    kit: Toolkit
    base_db: Any
    # task id -> (its initial DB, its gold state), computed on first use
    gold: dict[str, tuple[Any, GoldState]] = field(default_factory=dict)
    initial: dict[str, str] = field(default_factory=dict)  # task id -> hash of its initial DB

    def initial_hash(self, task: Task) -> str:
        if task.id not in self.initial:
            self.initial[task.id] = db_hash(self.state(task)[0])
        return self.initial[task.id]

    def state(self, task: Task) -> tuple[Any, GoldState]:
        if task.id not in self.gold:
            try:
                start = initial_db(self.kit, self.base_db, task)
            # Its initialization_data or initialization_actions do not fit the DB or the tools: a data problem.
            except Exception as e:
                raise UserError(f"task {task.id} of {self.domain.dir / 'tasks.json'}",
                                f"its initial state cannot be set up: {type(e).__name__}: {e}") from e  # fmt: skip
            self.gold[task.id] = (start, gold_state(self.kit, start, task))
        return self.gold[task.id]


@functools.lru_cache(maxsize=4)
def load(domain_dir: str, tools: str, db_model: str | None, stamp: tuple[float, ...] = ()) -> Loaded:
    """The domain, read once per process (``stamp``: the files' modification times, so an edit is read again)."""
    domain = load_domain(domain_dir)
    kit = Toolkit.load(tools)
    model = import_ref(db_model, "environment.db_model") if db_model else None
    return Loaded(domain, kit, build_db(read_db(domain.db_path), model, str(domain.db_path)))


def loaded(cfg: EnvironmentConfig) -> Loaded:
    assert cfg.domain_dir and cfg.tools  # the config validator requires both for tau2
    root = resolve_dir(cfg.domain_dir)
    files = ("db.json", "db.toml", "policy.md", "tasks.json", "split_tasks.json")
    stamp = tuple((root / f).stat().st_mtime if (root / f).is_file() else 0.0 for f in files)
    return load(cfg.domain_dir, cfg.tools, cfg.db_model, stamp)


def check_rows(cfg: EnvironmentConfig, rows: Sequence[dict[str, Any]], source: str) -> None:
    """Fail before any model loads when a row names no known task or a task needs what is not simulated; warn
    about tasks whose gold actions fail (their DB check is not evaluated, as in tau2)."""
    ld = loaded(cfg)
    problems, ids = [], []
    for i, row in enumerate(rows):
        try:
            ids.append(row_task_id(row))
        except KeyError:
            problems.append(f"row {i}: no task_id")
    missing = sorted({t for t in ids if t not in ld.domain.tasks})
    if missing:
        problems.append(f"task_id {missing[:5]} not in {ld.domain.dir / 'tasks.json'}")
    used = [ld.domain.tasks[t] for t in dict.fromkeys(ids) if t in ld.domain.tasks]
    for task in used:
        problems += [f"task {task.id}: {p}" for p in unsupported(task)]
        c = task.criteria
        if c is not None and "NL_ASSERTION" in c.reward_basis and not cfg.nl_judge:
            problems.append(
                f"task {task.id}: its reward basis has NL_ASSERTION; set environment.nl_judge: true"
            )
        unknown = sorted({a.name for a in (c.actions if c else ()) if a.name not in ld.kit.specs})
        if unknown:
            problems.append(f"task {task.id}: gold actions call {unknown}, not tools of {ld.kit.ref}")
    if problems:
        raise UserError(
            source, problems[:20], hint="check environment.domain_dir, environment.tools and the rows"
        )
    broken = [t.id for t in used if ld.state(t)[1].hash is None]
    if broken:
        print(f"warning: {ld.domain.dir}: gold actions of tasks {broken[:10]} fail, so their DB check is not "
              "evaluated (as tau2 does)", file=sys.stderr, flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- episodes


class Tau2Episode:
    """One task's conversation; see the module doc."""

    def __init__(self, env: Tau2Environment, task: Task, start_db: Any, gold: GoldState):
        self.env, self.task, self.gold = env, task, gold
        self.box = env.ld.kit.open(start_db)
        self.tools = env.tool_schemas
        self.messages: list[Message] = [
            {"role": "system", "content": env.system_prompt},
            {"role": "assistant", "content": FIRST_AGENT_MESSAGE},
        ]
        # The text turns only, as (speaker, text): the customer's view of the conversation.
        self.dialogue: list[tuple[str, str]] = [("agent", FIRST_AGENT_MESSAGE)]
        # Every turn and observation after the system prompt: the NL judge's view.
        self.transcript: list[Message] = list(self.messages[1:])
        self.user_system = system_prompt(task.scenario, env.guidelines)
        self.done = False
        self.turns = 0
        self.malformed = 0
        self.tool_errors = 0
        self.calls: list[ToolCall] = []
        self.agent_texts: list[str] = []
        self.turn_rewards: list[float] = []
        self.invalid: str | None = None
        self.user_fault: str | None = None
        self.termination: str | None = None
        self.verdict: Verdict | None = None
        self.first_call_done = False
        self.actions_credited = 0

    # ------------------------------------------------------------------ the customer

    async def begin(self) -> None:
        """Fetch the customer's first message (the agent's prompt ends with it)."""
        reply = await self._ask_user()
        if reply is None:
            return
        fault = self._check(reply, opening=True)
        if fault is not None:
            self._fault(fault)
            return
        self.messages.append({"role": "user", "content": reply})
        self.transcript.append({"role": "user", "content": reply})

    async def _ask_user(self) -> str | None:
        res = await self.env.user.complete(
            simulator_messages(self.user_system, self.dialogue), parse=parse_reply
        )
        if not res.ok:
            self.invalid, self.done = res.error or "user simulator failed", True
            return None
        self.dialogue.append(("user", res.value))
        return res.value

    def _check(self, reply: str, opening: bool = False) -> str | None:
        """The user fault in ``reply``, if any (``tau2_user``'s checks, as configured)."""
        checks = self.env.cfg.user_fault_checks
        if "role_break" in checks and (why := role_break(reply)):
            return f"role_break: {why}"
        if "goal_leak" in checks and (
            why := goal_leak(reply, list(self.env.ld.kit.specs), self.task.instruction_texts)
        ):
            return f"goal_leak: {why}"
        token = stop_token(reply)
        if token == OUT_OF_SCOPE:
            return "out_of_scope: the simulator found the scenario gave it nothing to continue with"
        if token is None:
            return None
        if opening:  # always a fault: the agent never had a turn, there is nothing to grade or train on
            return f"premature_stop: ended the conversation in its opening message ({token})"
        if "premature_stop" not in checks:
            return None
        confirming = bool(self.agent_texts) and asks_confirmation(self.agent_texts[-1])
        pending = self.box.writes == 0 and self.gold.hash not in (None, self.env.ld.initial_hash(self.task))
        transferred = any("transfer" in c.name for c in self.calls)
        why = premature_stop(token, False, confirming, pending, transferred)
        return None if why is None else f"premature_stop: {why}"

    def _fault(self, reason: str) -> StepResult:
        self.user_fault, self.done = reason, True
        return StepResult([], None, True, info={"user_fault": reason}, observation_from="user_simulator")

    # ------------------------------------------------------------------ agent turns

    async def step(self, agent_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.turns += 1
        self.transcript.append({"role": "assistant", "content": agent_text})
        action = parse_action(agent_text)
        if (
            action.kind == "text"
            and self.env.cfg.tool_shorthand
            and (name := self.env.shorthand(action.text))
        ):
            action.kind, action.name, action.arguments = "tool_call", name, {}
        if action.kind == "malformed":
            self.malformed += 1
            note = (f"Error: {action.error}. Call a tool as <tool_call>{{\"name\": <tool name>, \"arguments\": "
                    "{...}}</tool_call>, or write a message to the user.")  # fmt: skip
            return await self._next([{"role": "tool", "content": note}], 0.0, {"malformed": action.error})
        if action.kind == "tool_call":
            assert action.name is not None
            return await self._call(action.name, action.arguments)
        return await self._message(action.text)

    async def _call(self, name: str, arguments: dict[str, Any]) -> StepResult:
        self.calls.append(ToolCall(name, arguments))
        content, error = self.box.call(name, arguments)
        self.tool_errors += error is not None
        info: dict[str, Any] = {"tool": name, "arguments": arguments, "error": error}
        return await self._next([{"role": "tool", "content": content}], self._partial(name), info)

    async def _message(self, text: str) -> StepResult:
        self.agent_texts.append(text)
        self.dialogue.append(("agent", text))
        info: dict[str, Any] = {"message": excerpt(text)}
        if STOP in text:
            return await self._finish("agent_stop", 0.0, info)
        # Asked also on the last turn: the customer's ###STOP### there decides whether the episode is graded.
        reply = await self._ask_user()
        if reply is None:
            return StepResult([], None, True, invalid=self.invalid, info=info)
        info["user"] = excerpt(reply)
        fault = self._check(reply)
        if fault is not None:
            step = self._fault(fault)
            step.info.update(info)
            return step
        if stop_token(reply) in (STOP, TRANSFER):
            return await self._finish("user_stop", 0.0, info)
        return await self._next([{"role": "user", "content": reply}], 0.0, info, "user_simulator")

    async def _next(self, obs: list[Message], reward: float, info: dict[str, Any],
                    source: str = "environment") -> StepResult:  # fmt: skip
        """End the turn: the episode goes on with ``obs``, or stops for too many errors or turns (scored 0)."""
        if self.tool_errors + self.malformed >= self.env.cfg.max_tool_errors:
            return await self._finish("too_many_errors", reward, info)
        if self.turns >= self.env.max_turns:
            return await self._finish("max_turns", reward, info)
        self.turn_rewards.append(reward)
        self.transcript += obs
        return StepResult(obs, reward, False, info=info, observation_from=source)

    async def _finish(self, termination: str, reward: float, info: dict[str, Any]) -> StepResult:
        self.termination, self.done = termination, True
        if termination in ("user_stop", "agent_stop"):
            verdict = await self._grade()
            if verdict is None:
                return StepResult([], None, True, invalid=self.invalid, info=info)
        else:  # tau2: a run that did not end by a stop scores 0
            verdict = Verdict(0.0, {}, {"note": f"ended by {termination}"})
        self.verdict = verdict
        reward += verdict.reward
        self.turn_rewards.append(reward)
        info.update(
            termination=termination, reward=verdict.reward, breakdown=verdict.breakdown, checks=verdict.checks
        )
        return StepResult([], reward, True, info=info)

    def _partial(self, name: str) -> float:
        """The shaping reward this tool call earns (``environment.partial_reward``), weighted."""
        cfg, c = self.env.cfg, self.task.criteria
        gold = [a for a in (c.actions if c else ()) if a.requestor == "assistant"]
        if cfg.partial_reward == "none" or not gold:
            return 0.0
        if cfg.partial_reward == "first_call":
            if self.first_call_done:
                return 0.0
            self.first_call_done = True
            return cfg.partial_reward_weight * float(name == gold[0].name)
        matched = sum(matched_actions(gold, self.calls))
        new, self.actions_credited = matched - self.actions_credited, matched
        return cfg.partial_reward_weight * new / len(gold)

    async def _grade(self) -> Verdict | None:
        """tau2's reward (``tau2_eval``); None (and ``invalid`` set) when the NL judge failed."""
        task, c = self.task, self.task.criteria
        if c is None:
            return combine(task, None, [], [], [], None)
        db_match = None if self.gold.hash is None else self.box.db_hash() == self.gold.hash
        assertions = env_assertions_met(self.box, task)
        said = communicated(c.communicate_info, self.agent_texts)
        acted = matched_actions([a for a in c.actions if a.requestor == "assistant"], self.calls)
        nl = None
        if c.nl_assertions and ("NL_ASSERTION" in c.reward_basis or self.env.cfg.nl_judge):
            judge = self.env.judge
            assert judge is not None  # check_rows and the config validator require it
            k = len(c.nl_assertions)
            last = (
                [{"role": "user", "content": self.dialogue[-1][1]}] if self.termination == "user_stop" else []
            )
            msgs = nl_messages(self.transcript + last, c.nl_assertions)
            res = await judge.complete(msgs, parse=lambda t: parse_nl(t, k))
            if not res.ok:
                self.invalid = f"nl judge: {res.error or 'failed'}"
                return None
            nl = res.value
        return combine(task, db_match, assertions, said, acted, nl)

    def result(self) -> EpisodeResult:
        excluded = self.invalid is not None or self.user_fault is not None
        score = None if excluded else float(sum(self.turn_rewards))
        v = self.verdict
        info: dict[str, Any] = {
            "task_id": self.task.id,
            "termination": self.termination or ("excluded" if excluded else "truncated"),
            "tool_calls": len(self.calls),
            "tool_errors": self.tool_errors,
            "tau2_reward": None if v is None else v.reward,
        }
        if v is not None and v.breakdown:
            info["breakdown"] = v.breakdown
        if self.user_fault:
            info["user_fault"] = self.user_fault
        return EpisodeResult(score, list(self.turn_rewards), self.turns, self.invalid, self.malformed, info,
                             user_fault=self.user_fault)  # fmt: skip


class Tau2Environment:
    """``Environment`` for ``environment.name: tau2``. ``judge`` is needed for NL assertions only."""

    name = "tau2"

    def __init__(self, cfg: EnvironmentConfig, user: LLMClient, judge: LLMClient | None = None):
        self.cfg = cfg
        self.max_turns = cfg.max_turns
        self.user = user
        self.judge = judge
        self.ld = loaded(cfg)
        self.guidelines = load_guidelines(cfg.user_guidelines)
        names = list(self.ld.kit.specs)
        if cfg.tool_shorthand:
            # Names and arguments as text: the tiny quickstart model's context cannot hold JSON schemas.
            listing = ", ".join(
                f"{n}({', '.join(s.params.model_fields)})" for n, s in self.ld.kit.specs.items()
            )
            self.system_prompt = agent_system_prompt(self.ld.domain.policy, listing)
            self.tool_schemas: list[dict[str, Any]] | None = None
        else:
            self.system_prompt = agent_system_prompt(self.ld.domain.policy)
            self.tool_schemas = self.ld.kit.schemas()
        self._names = names

    def shorthand(self, text: str) -> str | None:
        """The tool ``text`` names: its exact name, or a prefix no other tool's name shares."""
        word = text.strip().lower()
        if not word:
            return None
        if word in self._names:
            return word
        hits = [n for n in self._names if n.startswith(word)]
        return hits[0] if len(hits) == 1 else None

    def start(self, row: dict[str, Any]) -> Tau2Episode:
        tid = row_task_id(row)
        task = self.ld.domain.tasks.get(tid)
        if task is None:
            raise UserError(str(self.ld.domain.dir / "tasks.json"), f"task_id {tid!r} not found",
                            hint="check environment.domain_dir")  # fmt: skip
        start_db, gold = self.ld.state(task)
        return Tau2Episode(self, task, start_db, gold)
