"""tau2-bench's domain format, read without tau2: the files of a domain directory, its tasks, its dataset rows.

A domain directory (``environment.domain_dir``) holds what tau2-bench ships per domain under
``data/tau2/domains/<domain>/``::

    db.json (or db.toml)   the world state every episode starts from
    policy.md              the agent's rules, put in its system prompt
    tasks.json             the tasks: user scenario and evaluation criteria (tau2's ``Task`` model)
    split_tasks.json       optional: {"train": [task ids], "test": [...], ...}

``builtin:<name>`` names a domain shipped with userloop (``trainer/envs/domains/<name>/``: ``bookshop``).
Tasks are parsed leniently, as tau2's pydantic models do (unknown keys such as ``annotations`` are
ignored), into the frozen dataclasses below (``src/tau2/data_model/tasks.py``: ``Task``, ``UserScenario``,
``StructuredUserInstructions``, ``EvaluationCriteria``, ``Action``, ``EnvAssertion``). Features the
environment cannot run (user-side tools, a pre-recorded message history) are reported by
``unsupported`` for the tasks a run actually uses, before any model is loaded.

Dataset rows (``data.generate.task: tau2-tasks``) name a task each: ``{"prompt": "task <id>", "task_id": <id>}``.
The prompt is a placeholder the trainer needs; the environment builds the conversation from the task.
"""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.envs.base import index_by_id
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config.schema import RunConfig

REWARD_TYPES = ("DB", "ENV_ASSERTION", "NL_ASSERTION", "ACTION", "COMMUNICATE")
DEFAULT_BASIS = ("DB", "COMMUNICATE")  # tau2's EvaluationCriteria.reward_basis default
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Action:
    """A reference tool call (``EvaluationCriteria.actions``) or an initialization action."""

    action_id: str
    name: str
    arguments: dict[str, Any]
    requestor: str = "assistant"
    compare_args: tuple[str, ...] | None = None  # None: compare all the call's arguments (tau2)


@dataclass(frozen=True)
class EnvAssertion:
    env_type: str
    func_name: str
    arguments: dict[str, Any]
    assert_value: bool = True


@dataclass(frozen=True)
class Criteria:
    actions: tuple[Action, ...] = ()
    env_assertions: tuple[EnvAssertion, ...] = ()
    communicate_info: tuple[str, ...] = ()
    nl_assertions: tuple[str, ...] = ()
    reward_basis: tuple[str, ...] = DEFAULT_BASIS


@dataclass(frozen=True)
class Task:
    id: str
    scenario: str  # str(UserScenario) as tau2 renders it into the user simulator's <scenario>
    # The scenario's strings (reason for call, known info, ...), for the goal-leak check.
    instruction_texts: tuple[str, ...]
    criteria: Criteria | None
    agent_data: dict[str, Any] | None = None  # initial_state.initialization_data.agent_data
    user_data: dict[str, Any] | None = None
    initialization_actions: tuple[EnvAssertion, ...] = ()  # EnvFunctionCall: env_type, func_name, arguments
    message_history: tuple[dict[str, Any], ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Domain:
    dir: Path
    policy: str
    db_path: Path
    tasks: dict[str, Task]
    splits: dict[str, list[str]]


# ----------------------------------------------------------------------------- rendering (tau2's __str__)


def _indent(text: str) -> str:
    return textwrap.indent(text, "\t")


def render_instructions(ins: dict[str, Any] | str) -> str:
    """``StructuredUserInstructions.__str__`` (or a plain-string instruction as it is)."""
    if isinstance(ins, str):
        return ins
    lines = [f"Domain: {ins['domain']}", f"Reason for call:\n{_indent(ins['reason_for_call'])}"]
    if ins.get("known_info") is not None:
        lines.append(f"Known info:\n{_indent(ins['known_info'])}")
    if ins.get("unknown_info") is not None:
        lines.append(f"Unknown info:\n{_indent(ins['unknown_info'])}")
    lines.append(f"Task instructions:\n{_indent(ins['task_instructions'])}")
    return "\n".join(lines)


def render_scenario(scenario: dict[str, Any]) -> str:
    """``UserScenario.__str__``: the persona (if any) and the instructions, tab-indented."""
    lines = []
    if scenario.get("persona") is not None:
        lines += ["Persona:", _indent(scenario["persona"])]
    lines += ["Instructions:", _indent(render_instructions(scenario["instructions"]))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of strings")
    return tuple(value)


def _action(a: Any, where: str) -> Action:
    if (
        not isinstance(a, dict)
        or not isinstance(a.get("name"), str)
        or not isinstance(a.get("arguments"), dict)
    ):
        raise ValueError(f"{where} needs a string name and an arguments object")
    requestor = a.get("requestor", "assistant")
    if requestor not in ("assistant", "user"):
        raise ValueError(f"{where}.requestor is {requestor!r}; allowed: assistant, user")
    cmp = a.get("compare_args")
    return Action(str(a.get("action_id", a["name"])), a["name"], a["arguments"], requestor,
                  None if cmp is None else _str_list(cmp, f"{where}.compare_args"))  # fmt: skip


def _call(a: Any, where: str) -> EnvAssertion:
    if not isinstance(a, dict) or not isinstance(a.get("func_name"), str):
        raise ValueError(f"{where} needs env_type, func_name and arguments")
    return EnvAssertion(str(a.get("env_type", "assistant")), a["func_name"], dict(a.get("arguments") or {}),
                        bool(a.get("assert_value", True)))  # fmt: skip


def _criteria(c: Any) -> Criteria | None:
    if c is None:
        return None
    if not isinstance(c, dict):
        raise ValueError("evaluation_criteria must be an object")
    basis = _str_list(c.get("reward_basis", list(DEFAULT_BASIS)), "reward_basis")
    bad = [b for b in basis if b not in REWARD_TYPES]
    if bad:
        raise ValueError(f"reward_basis has {bad}; allowed: {', '.join(REWARD_TYPES)}")
    return Criteria(
        tuple(_action(a, f"actions[{i}]") for i, a in enumerate(c.get("actions") or [])),
        tuple(_call(a, f"env_assertions[{i}]") for i, a in enumerate(c.get("env_assertions") or [])),
        _str_list(c.get("communicate_info"), "communicate_info"),
        _str_list(c.get("nl_assertions"), "nl_assertions"),
        basis,
    )


def parse_task(entry: Any) -> Task:
    """One ``tasks.json`` entry; ``ValueError`` says what is missing or malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    if "id" not in entry:
        raise ValueError("no id")
    scenario = entry.get("user_scenario")
    if not isinstance(scenario, dict) or "instructions" not in scenario:
        raise ValueError("user_scenario.instructions is missing")
    ins = scenario["instructions"]
    if isinstance(ins, dict):
        missing = [
            k for k in ("domain", "reason_for_call", "task_instructions") if not isinstance(ins.get(k), str)
        ]
        if missing:
            raise ValueError(f"user_scenario.instructions lacks {', '.join(missing)}")
        texts = tuple(v for k, v in ins.items() if k != "domain" and isinstance(v, str))
    elif isinstance(ins, str):
        texts = (ins,)
    else:
        raise ValueError("user_scenario.instructions must be an object or a string")
    if isinstance(scenario.get("persona"), str):
        texts += (scenario["persona"],)
    init = entry.get("initial_state") or {}
    data = init.get("initialization_data") or {}
    return Task(
        id=str(entry["id"]),
        scenario=render_scenario(scenario),
        instruction_texts=texts,
        criteria=_criteria(entry.get("evaluation_criteria")),
        agent_data=data.get("agent_data"),
        user_data=data.get("user_data"),
        initialization_actions=tuple(
            _call(a, f"initialization_actions[{i}]")
            for i, a in enumerate(init.get("initialization_actions") or [])
        ),
        message_history=tuple(init.get("message_history") or ()),
        raw=entry,
    )


def unsupported(task: Task) -> list[str]:
    """What the task needs that this environment does not simulate (tau2's telecom domain uses all of these)."""
    out = []
    c = task.criteria
    if c is not None and any(a.requestor == "user" for a in c.actions):
        out.append("reference actions by the user (requestor: user) need user-side tools")
    if c is not None and any(a.env_type != "assistant" for a in c.env_assertions):
        out.append("env_assertions on the user's environment need user-side tools")
    if task.user_data or any(a.env_type != "assistant" for a in task.initialization_actions):
        out.append("initial_state on the user's environment needs user-side tools")
    if task.message_history:
        out.append("initial_state.message_history (a conversation already under way) is not replayed")
    return out


# ----------------------------------------------------------------------------- the domain directory


def resolve_dir(domain_dir: str) -> Path:
    if domain_dir.startswith(BUILTIN_PREFIX):
        name = domain_dir[len(BUILTIN_PREFIX) :]
        path = Path(__file__).parent / "domains" / name
        if not (path / "tasks.json").is_file():
            shipped = sorted(
                p.name for p in (Path(__file__).parent / "domains").iterdir() if (p / "tasks.json").is_file()
            )
            raise UserError(
                "environment.domain_dir", f"no built-in domain {name!r}; built in: {', '.join(shipped)}"
            )
        return path
    return Path(domain_dir)


def load_domain(domain_dir: str) -> Domain:
    """Read and check a domain directory; every malformed task is reported with its index."""
    root = resolve_dir(domain_dir)
    if not root.is_dir():
        raise UserError(f"environment.domain_dir: {domain_dir}", "directory not found",
                        hint="point it at a domain folder, e.g. <tau2-bench>/data/tau2/domains/airline")  # fmt: skip
    db_path = next((root / n for n in ("db.json", "db.toml") if (root / n).is_file()), None)
    missing = [n for n, ok in (("db.json", db_path is not None), ("policy.md", (root / "policy.md").is_file()),
                               ("tasks.json", (root / "tasks.json").is_file())) if not ok]  # fmt: skip
    if missing:
        raise UserError(str(root), f"missing {', '.join(missing)}",
                        hint="a tau2 domain folder holds db.json, policy.md, tasks.json (and split_tasks.json)")  # fmt: skip
    assert db_path is not None
    tasks: dict[str, Task] = index_by_id(_json(root / "tasks.json"), parse_task, str(root / "tasks.json"), "task",
                                         "see tau2-bench's src/tau2/data_model/tasks.py")  # fmt: skip
    splits: dict[str, list[str]] = {}
    split_path = root / "split_tasks.json"
    if split_path.is_file():
        splits_raw = _json(split_path)
        if not isinstance(splits_raw, dict):
            raise UserError(str(split_path), "expected {split name: [task ids]}")
        splits = {str(k): [str(i) for i in v] for k, v in splits_raw.items()}
        unknown = sorted({i for ids in splits.values() for i in ids} - set(tasks))
        if unknown:
            raise UserError(str(split_path), f"task ids {unknown[:5]} are not in tasks.json")
    policy = (root / "policy.md").read_text(encoding="utf-8")
    return Domain(root, policy, db_path, tasks, splits)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(str(path), f"invalid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None


def split_ids(domain: Domain, split: str) -> list[str]:
    """The task ids of ``split``; ``all`` is every task, in file order."""
    if split == "all":
        return list(domain.tasks)
    if split not in domain.splits:
        have = ", ".join(sorted(domain.splits)) or "none: there is no split_tasks.json"
        raise UserError(f"environment split {split!r}", f"not a split of {domain.dir}; splits: {have}",
                        hint="set environment.task_split / val_task_split, or `all`")  # fmt: skip
    return list(domain.splits[split])


# ----------------------------------------------------------------------------- dataset rows


TASK_ID = "task_id"


def task_rows(ids: Sequence[str], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows cycling through ``ids`` (each pass in a shuffled order, so a partial last pass is no bias
    toward the file's first tasks)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        order = list(ids)
        rng.shuffle(order)
        rows += [{"prompt": f"task {i}", TASK_ID: i} for i in order[: n - len(rows)]]
    return rows


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """JSONL, written to a temporary name and renamed: a run killed meanwhile leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_generated_rows(cfg: RunConfig) -> None:
    """``data.generate.task: tau2-tasks``: the rows of ``data.train.path`` (tasks of ``environment.task_split``)
    and ``data.val.path`` (``val_task_split``), each written only when missing (a resumed run keeps its rows)."""
    g, data, env = cfg.data.generate, cfg.data, cfg.environment
    assert g is not None and env.domain_dir is not None
    jobs = [(data.train.path, env.task_split, g.train_size, g.seed)]
    if data.val is not None:
        jobs.append((data.val.path, env.val_task_split, g.val_size, g.seed + 1_000_003))
    domain = None
    for path, split, n, seed in jobs:
        if Path(path).exists():
            continue
        domain = domain or load_domain(env.domain_dir)
        write_rows(path, task_rows(split_ids(domain, split), n, seed))


def row_task_id(row: dict[str, Any]) -> str:
    """The task a loader row (``{"prompt", "row"}``) or a raw record names."""
    original = row["row"] if isinstance(row.get("row"), dict) else row
    if TASK_ID not in original:
        raise KeyError(TASK_ID)
    return str(original[TASK_ID])


def main() -> None:
    """``python -m trainer.envs.tau2_format --domain-dir DIR --split train --out rows.jsonl``: one row per task."""
    import argparse

    ap = argparse.ArgumentParser(description="Write dataset rows naming the tasks of a tau2 domain's split.")
    ap.add_argument("--domain-dir", required=True)
    ap.add_argument("--split", default="train", help="a key of split_tasks.json, or `all`")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--rows", type=int, default=None, help="rows (cycling through the tasks); default one per task"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ids = split_ids(load_domain(args.domain_dir), args.split)
    write_rows(args.out, task_rows(ids, args.rows or len(ids), args.seed))
    print(f"{args.out}: {args.rows or len(ids)} rows over {len(ids)} tasks of split {args.split}")


if __name__ == "__main__":
    main()
