"""The tau2 environment on the built-in bookshop domain, with scripted agents and simulated customers.

What is real: the domain's files, its tools, the loader, the DB copies and hashes, tau2's grading rules.
What is scripted: the agent's replies (exact tool calls) and the customer's (``ScriptedClient``), so every
rule can be hit on purpose; the simulator over a real OpenAI-compatible server is in
``tests/llm/test_tau2_serve.py``, GRPO learning on this domain in ``tests/trainer/test_tau2_run.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from enum import Enum
from pathlib import Path

import pytest
from pydantic import BaseModel

from trainer.config.multiturn import EnvironmentConfig
from trainer.envs import check_data
from trainer.envs.tau2 import Tau2Environment, Tau2Episode
from trainer.envs.tau2_format import load_domain, parse_task, split_ids, task_rows
from trainer.envs.toolkit import Toolkit, build_db, parse_docstring
from trainer.errors import UserError
from trainer.testing.scripted import ScriptedClient

TOOLS = "trainer.envs.domains.bookshop.tools:BookshopTools"
CUSTOMER = "Hi, I need some help with my order please."


def make_env(
    user: ScriptedClient | None = None, judge: ScriptedClient | None = None, **kw
) -> Tau2Environment:
    cfg = EnvironmentConfig(name="tau2", domain_dir="builtin:bookshop", tools=TOOLS, max_turns=kw.pop("max_turns", 10),
                            **kw)  # fmt: skip
    return Tau2Environment(cfg, user or ScriptedClient(lambda m: CUSTOMER, role="user_simulator"), judge)


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def play(episode: Tau2Episode, replies: list[str]) -> list:
    async def run() -> list:
        await episode.begin()
        steps = []
        for r in replies:
            if episode.done:
                break
            steps.append(await episode.step(r))
        return steps

    return asyncio.run(run())


def gold_replies(episode: Tau2Episode, closing: str = "Done. ###STOP###") -> list[str]:
    c = episode.task.criteria
    assert c is not None
    said = " ".join(c.communicate_info)
    return [call(a.name, **a.arguments) for a in c.actions] + [f"{said} {closing}".strip()]


def test_every_tasks_gold_actions_score_one() -> None:
    env = make_env()
    assert len(env.ld.domain.tasks) >= 20
    for tid, task in env.ld.domain.tasks.items():
        assert task.criteria and task.criteria.actions[0].name == "find_user"  # the quickstart's signal
        episode = env.start({"task_id": tid})
        steps = play(episode, gold_replies(episode))
        assert all(s.info.get("error") is None for s in steps), (tid, steps)
        result = episode.result()
        assert result.score == 1.0, (tid, steps[-1].info)
        assert steps[-1].info["termination"] == "agent_stop"
        assert steps[-1].info["breakdown"] == {"DB": 1.0, "COMMUNICATE": 1.0}
        assert result.info["tool_errors"] == 0 and result.info["tau2_reward"] == 1.0


def test_a_wrong_action_scores_zero_by_db_mismatch() -> None:
    env = make_env()
    # Task 0: cancel B1001 as "no longer needed"; the refund (33) must be said.
    for wrong in (call("cancel_order", order_id="B1001", reason="ordered by mistake"),  # wrong reason
                  call("change_address", order_id="B1001", address="1 Nowhere Road")):  # wrong write  # fmt: skip
        episode = env.start({"task_id": "0"})
        steps = play(episode, [call("find_user", email="ada.park@example.com"), call("get_order", order_id="B1001"),
                               wrong, "Your refund is 33. ###STOP###"])  # fmt: skip
        assert episode.result().score == 0.0
        assert steps[-1].info["breakdown"] == {"DB": 0.0, "COMMUNICATE": 1.0}
        assert steps[-1].info["checks"]["db_match"] is False
    # The right DB but the refund not said: tau2's communicate check fails.
    episode = env.start({"task_id": "0"})
    steps = play(episode, gold_replies(episode)[:-1] + ["It is cancelled. ###STOP###"])
    assert episode.result().score == 0.0 and steps[-1].info["breakdown"] == {"DB": 1.0, "COMMUNICATE": 0.0}
    # Episodes share the pristine DB until their first write: nothing leaked into the next one.
    assert env.ld.base_db["orders"]["B1001"]["status"] == "pending"


def test_the_customer_ends_the_episode_with_tau2s_tokens() -> None:
    replies = iter([CUSTOMER, "My email is ada.park@example.com.", "Thanks, that's all. ###STOP###"])
    env = make_env(ScriptedClient(lambda m: next(replies), role="user_simulator"))
    episode = env.start({"task_id": "16"})  # status of B1003: read-only, "shipped" must be said
    steps = play(episode, ["May I have your email?", call("find_user", email="ben.ito@example.com"),
                           call("get_order", order_id="B1003"), "Your order B1003 has shipped."])  # fmt: skip
    assert [s.observation_from for s in steps[:-1]] == ["user_simulator", "environment", "environment"]
    assert steps[-1].info["termination"] == "user_stop" and episode.result().score == 1.0
    # The simulator saw the conversation with roles flipped and no tool traffic (tau2's flip_roles).
    last = env.user.calls[-1]  # type: ignore[attr-defined]
    assert last[0]["role"] == "system" and "<scenario>" in last[0]["content"]
    assert [m["role"] for m in last[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert last[1]["content"] == "Hi! How can I help you today?" and "shipped" in last[-1]["content"]
    assert all("tool_call" not in m["content"] for m in last)


def test_transfer_ends_and_is_graded() -> None:
    replies = iter([CUSTOMER, "###TRANSFER###"])
    env = make_env(ScriptedClient(lambda m: next(replies), role="user_simulator"))
    episode = env.start({"task_id": "23"})
    steps = play(episode, gold_replies(episode, "")[:-1] + ["I have transferred you to a human agent."])
    assert steps[-1].info["termination"] == "user_stop" and episode.result().score == 1.0


def test_tool_errors_are_counted_and_never_crash() -> None:
    env = make_env(max_tool_errors=4)
    episode = env.start({"task_id": "0"})
    steps = play(episode, [call("find_user"),                       # missing argument
                           call("no_such_tool", x=1),               # unknown tool
                           call("get_order", order_id="Z9"),        # the tool's own error
                           '<tool_call>{"name": "get_order", </tool_call>',  # not JSON: malformed
                           "never reached"])  # fmt: skip
    assert [s.observation[0]["content"].split(":")[0] for s in steps[:3]] == ["Error"] * 3
    assert steps[1].info["error"] == "Tool 'no_such_tool' not found."
    assert steps[2].info["error"] == "Order Z9 not found"
    assert steps[-1].info["termination"] == "too_many_errors" and steps[-1].reward == 0.0
    r = episode.result()
    assert r.score == 0.0 and r.info["tool_errors"] == 3 and r.malformed_actions == 1 and r.turns == 4


def test_running_out_of_turns_scores_zero_but_keeps_partial_rewards() -> None:
    env = make_env(max_turns=2, partial_reward="actions", partial_reward_weight=0.3)
    episode = env.start({"task_id": "0"})
    steps = play(episode, gold_replies(episode))
    assert steps[-1].info["termination"] == "max_turns"
    assert [s.reward for s in steps] == pytest.approx([0.1, 0.1])  # 2 of 3 gold actions matched, x0.3
    assert episode.result().score == pytest.approx(0.2)
    env = make_env(partial_reward="first_call")
    for first, expected in (
        (call("get_order", order_id="B1001"), 0.0),
        (call("find_user", email="x@y"), 1.0),
    ):
        episode = env.start({"task_id": "0"})
        steps = play(episode, [first, call("find_user", email="ada.park@example.com")])
        assert [s.reward for s in steps] == [expected, 0.0]  # only the first call counts


def test_tool_shorthand_calls_a_tool_by_a_unique_prefix() -> None:
    env = make_env(tool_shorthand=True, partial_reward="first_call")
    assert env.tool_schemas is None and "find_user(email)" in env.system_prompt
    assert [env.shorthand(t) for t in ("f", " F", "find_user", "g", "c", "ch", "x", "")] == [
        "find_user", "find_user", "find_user", "get_order", None, "change_address", None, None]  # fmt: skip
    episode = env.start({"task_id": "0"})
    steps = play(episode, ["f"])
    assert steps[0].info["tool"] == "find_user" and steps[0].reward == 1.0 and steps[0].info["error"]


@pytest.mark.parametrize(
    ("reply", "fault"),
    [
        ("Hello! How can I help you today?", "role_break: wrote as the agent"),
        ("As an AI language model I cannot shop.", "role_break: wrote as the agent"),
        ('<tool_call>{"name": "find_user"}</tool_call>', "role_break: wrote a tool call"),
        ("Please run cancel_order on B1001.", "goal_leak: named the agent's tool cancel_order"),
        ("Task instructions: give the reason if asked.", "goal_leak: quoted the prompt"),
        (
            "You want to cancel your order B1001 because you no longer need it.",
            "goal_leak: copied its instructions",
        ),
        ("Thanks! ###STOP###", "premature_stop: ended the conversation in its opening message"),
        ("I have no idea what to do. ###OUT-OF-SCOPE###", "out_of_scope"),
    ],
)
def test_a_faulty_opening_excludes_the_episode(reply: str, fault: str) -> None:
    env = make_env(ScriptedClient(lambda m: reply, role="user_simulator"))
    episode = env.start({"task_id": "0"})
    play(episode, [])
    result = episode.result()
    assert episode.done and result.score is None and result.invalid is None
    assert result.user_fault and result.user_fault.startswith(fault), result.user_fault


def test_premature_stop_needs_a_pending_confirmation() -> None:
    confirm = "I will cancel order B1001 as no longer needed. Shall I proceed?"
    lookup = [call("find_user", email="ada.park@example.com"), call("get_order", order_id="B1001")]

    def episode_with(agent: list[str]) -> Tau2Episode:
        replies = iter([CUSTOMER, "Thanks, bye. ###STOP###"])
        episode = make_env(ScriptedClient(lambda m: next(replies), role="user_simulator")).start(
            {"task_id": "0"}
        )
        play(episode, agent)
        return episode

    # The agent asks to confirm the cancellation, the customer stops instead of answering: its fault.
    faulty = episode_with([*lookup, confirm]).result()
    assert faulty.score is None and "request for confirmation" in (faulty.user_fault or "")
    # After a refusal, or "anything else?", the stop is the agent's outcome: graded (0, the DB was not changed).
    for agent in ("I cannot cancel it. Is there anything else?", "Sorry, cancelling is not possible."):
        graded = episode_with([*lookup, agent]).result()
        assert graded.user_fault is None and graded.score == 0.0
    # A transfer the agent never made.
    replies = iter([CUSTOMER, "###TRANSFER###"])
    episode = make_env(ScriptedClient(lambda m: next(replies), role="user_simulator")).start({"task_id": "0"})
    play(episode, ["One moment please."])
    assert "claimed a transfer" in (episode.result().user_fault or "")


def test_checks_can_be_turned_off() -> None:
    env = make_env(ScriptedClient(lambda m: "Please run cancel_order for me.", role="user_simulator"),
                   user_fault_checks=[])  # fmt: skip
    episode = env.start({"task_id": "0"})
    play(episode, [])
    assert not episode.done and episode.messages[-1]["content"] == "Please run cancel_order for me."


def test_a_failed_simulator_call_is_invalid_never_zero() -> None:
    env = make_env(ScriptedClient([ScriptedClient.FAIL], role="user_simulator"))
    episode = env.start({"task_id": "0"})
    play(episode, [])
    r = episode.result()
    assert r.score is None and r.user_fault is None and "scripted failure" in (r.invalid or "")
    env = make_env(ScriptedClient([CUSTOMER, ScriptedClient.FAIL], role="user_simulator"))
    episode = env.start({"task_id": "0"})
    steps = play(episode, ["What is your email?"])
    assert steps[-1].invalid and steps[-1].reward is None and episode.result().score is None


def test_nl_assertions_judge() -> None:
    refuse = ["I am sorry, a shipped order cannot be cancelled. ###STOP###"]
    ok = ScriptedClient(
        lambda m: '{"results": [{"expectedOutcome": "x", "reasoning": "r", "metExpectation": true}]}'
    )
    no = ScriptedClient(
        lambda m: '{"results": [{"expectedOutcome": "x", "reasoning": "r", "metExpectation": false}]}'
    )
    for judge, score in ((ok, 1.0), (no, 0.0)):
        episode = make_env(judge=judge, nl_judge=True).start({"task_id": "20"})
        steps = play(episode, gold_replies(episode, "")[:-1] + refuse)
        assert episode.result().score == score and steps[-1].info["checks"]["nl_assertions"]
    prompt = ok.calls[0][1]["content"]
    assert "The agent does not cancel the order" in prompt and "shipped order cannot be cancelled" in prompt
    bad = ScriptedClient(lambda m: "I think the agent did fine.")
    episode = make_env(judge=bad, nl_judge=True).start({"task_id": "20"})
    steps = play(episode, gold_replies(episode, "")[:-1] + refuse)
    assert steps[-1].invalid and "nl judge" in steps[-1].invalid and episode.result().score is None
    episode = make_env().start({"task_id": "20"})  # without nl_judge: not in the basis, not judged
    play(episode, gold_replies(episode, "")[:-1] + refuse)
    assert episode.result().score == 1.0


# ----------------------------------------------------------------------------- the format and the loader


def test_loader_reads_tau2_tasks_leniently_and_reports_bad_ones(tmp_path: Path) -> None:
    task = parse_task({
        "id": 7, "annotations": None, "user_scenario": {"persona": "Calm.", "instructions": "Cancel my order."},
        "evaluation_criteria": {"actions": [{"action_id": "a", "name": "get_order", "arguments": {"order_id": "B1"}}]},
    })  # fmt: skip
    assert task.id == "7" and task.scenario == "Persona:\n\tCalm.\nInstructions:\n\tCancel my order."
    assert task.criteria and task.criteria.reward_basis == ("DB", "COMMUNICATE")
    structured = load_domain("builtin:bookshop").tasks["0"].scenario
    assert structured.startswith(
        "Instructions:\n\tDomain: bookshop\n\tReason for call:\n\t\tYou want to cancel"
    )
    bad = tmp_path / "d"
    bad.mkdir()
    for name in ("db.json", "policy.md"):
        (bad / name).write_text("{}")
    (bad / "tasks.json").write_text(json.dumps([{"id": "1"}, {"id": "2", "user_scenario": {"instructions": "x"},
                                                "evaluation_criteria": {"reward_basis": ["DB", "VIBES"]}}]))  # fmt: skip
    with pytest.raises(UserError) as e:
        load_domain(str(bad))
    text = e.value.render()
    assert (
        "task 0: user_scenario.instructions is missing" in text
        and "task 1: reward_basis has ['VIBES']" in text
    )
    with pytest.raises(UserError, match="no built-in domain 'nope'; built in: bookshop"):
        load_domain("builtin:nope")
    with pytest.raises(UserError, match="missing db.json, policy.md, tasks.json"):
        load_domain(str(tmp_path))


def test_rows_name_the_tasks_of_a_split_and_are_checked_before_training() -> None:
    domain = load_domain("builtin:bookshop")
    train, test = split_ids(domain, "train"), split_ids(domain, "test")
    assert len(train) + len(test) == len(domain.tasks) and not set(train) & set(test)
    rows = task_rows(train, 40, seed=0)
    assert len(rows) == 40 and {r["task_id"] for r in rows[: len(train)]} == set(train)  # each once per pass
    with pytest.raises(UserError, match="splits: test, train"):
        split_ids(domain, "dev")
    cfg = EnvironmentConfig(name="tau2", domain_dir="builtin:bookshop", tools=TOOLS)
    check_data(cfg, "train", [{"prompt": [], "row": r} for r in rows], "data.train")
    with pytest.raises(UserError) as e:
        check_data(cfg, "train", [{"task_id": "99"}, {"prompt": "no id"}], "data.train")
    assert "task_id ['99'] not in" in e.value.render() and "row 1: no task_id" in e.value.render()


def test_tasks_that_need_what_is_not_simulated_fail_early(tmp_path: Path) -> None:
    root = tmp_path / "telecom-like"
    src = load_domain("builtin:bookshop").dir
    root.mkdir()
    for name in ("db.json", "policy.md"):
        (root / name).write_text((src / name).read_text())
    (root / "tasks.json").write_text(json.dumps([{
        "id": "t", "user_scenario": {"instructions": "Turn airplane mode off."},
        "evaluation_criteria": {"actions": [{"action_id": "u", "name": "toggle_airplane_mode", "arguments": {},
                                             "requestor": "user"}], "reward_basis": ["DB", "NL_ASSERTION"]}}]))  # fmt: skip
    cfg = EnvironmentConfig(name="tau2", domain_dir=str(root), tools=TOOLS)
    with pytest.raises(UserError) as e:
        check_data(cfg, "train", [{"task_id": "t"}], "data.train")
    text = e.value.render()
    assert "requestor: user" in text and "set environment.nl_judge: true" in text
    assert "gold actions call ['toggle_airplane_mode']" in text


# ----------------------------------------------------------------------------- tau2's own tool classes, duck-typed


class ToolType(str, Enum):  # tau2.environment.toolkit.ToolType
    READ = "read"
    WRITE = "write"
    GENERIC = "generic"


def is_tool(tool_type: ToolType = ToolType.READ, mutates_state: bool | None = None):  # tau2's decorator
    def decorator(func):
        func.__tool__ = True
        func.__tool_type__ = tool_type
        func.__mutates_state__ = tool_type == ToolType.WRITE if mutates_state is None else mutates_state
        return func

    return decorator


class Seat(BaseModel):
    row: int
    letter: str


class FlightDB(BaseModel):  # a tau2 ``DB``: a pydantic model, hashed through model_dump()
    seats: dict[str, Seat]


class ToolKitBase:  # what tau2's ToolKitBase gives a domain: self.db
    def __init__(self, db=None):
        self.db = db


class GenericToolKit(ToolKitBase):
    @is_tool(ToolType.GENERIC)
    def calculate(self, expression: str) -> str:
        """Calculate the result of a mathematical expression.

        Args:
            expression: The expression, such as '2 + 2'. It can contain
                numbers and operators.
        """
        return str(eval(expression, {"__builtins__": None}, {}))


class AirlineLikeTools(GenericToolKit):
    @is_tool(ToolType.WRITE)
    def assign_seats(self, passenger: str, seats: list[Seat | dict]) -> Seat:
        """Assign a seat.

        The first seat given wins.

        Args:
            passenger: The passenger's id.
            seats: The seats asked for, such as [{"row": 1, "letter": "A"}].
        """
        if passenger not in ("p1",):
            raise ValueError(f"Passenger {passenger} not found")
        seat = Seat(**seats[0]) if isinstance(seats[0], dict) else seats[0]
        self.db.seats[passenger] = seat
        return seat

    def helper(self) -> None:  # not a tool
        return None

    def _hidden(self, x: int) -> int:
        return x

    _hidden.__tool__ = True  # type: ignore[attr-defined]
    _hidden.__discoverable__ = True  # type: ignore[attr-defined]


def test_tau2_style_tool_classes_plug_in_duck_typed() -> None:
    kit = Toolkit(AirlineLikeTools)
    assert list(kit.specs) == ["assign_seats", "calculate"]  # own tools, then inherited; discoverable hidden
    assert kit.specs["assign_seats"].mutates and not kit.specs["calculate"].mutates
    fn = kit.specs["assign_seats"].schema["function"]
    assert fn["description"] == "Assign a seat.\n\nThe first seat given wins."
    assert fn["parameters"]["required"] == ["passenger", "seats"]
    assert fn["parameters"]["properties"]["seats"]["description"].startswith("The seats asked for")
    assert "numbers and operators" in kit.specs["calculate"].schema["function"]["parameters"]["properties"][
        "expression"]["description"]  # fmt: skip
    db = build_db({"seats": {}}, FlightDB, "db.json")
    box = kit.open(db)
    content, error = box.call("assign_seats", {"passenger": "p1", "seats": [{"row": 3, "letter": "C"}]})
    assert error is None and json.loads(content) == {"row": 3, "letter": "C"}
    assert db.seats == {}  # the shared DB: the write went to the episode's copy
    want = hashlib.sha256(json.dumps(box.db.model_dump(), sort_keys=True, default=str).encode()).hexdigest()
    assert box.db_hash() == want  # tau2's get_dict_hash(db.model_dump())
    assert box.call("assign_seats", {"passenger": "p9", "seats": []}) == ("Error: Passenger p9 not found",
                                                                           "Passenger p9 not found")  # fmt: skip
    assert box.call("calculate", {"expression": "2 * 21"}) == ("42", None)  # a str result goes back as it is
    assert parse_docstring("Short.\n\nArgs:\n    a: first\n        line two\n    b: second")[1] == {
        "a": "first line two", "b": "second"}  # fmt: skip


# ----------------------------------------------------------------------------- config and packaging

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["user_simulator=null"], "environment.name is tau2 but user_simulator is not set"),
        (["environment.tools=null"], "environment.name is tau2 but tools not set"),
        (["environment.score=mean"], "a tau2 episode's score is the sum of its turn rewards"),
        (
            ["data.generate.task=next-letter"],
            "tau2-tasks writes rows naming the tasks of environment.domain_dir",
        ),
        (["environment.nl_judge=true"], "environment.nl_judge need(s) the judge LLM but judge is not set"),
        (["environment.partial_reward=most"], "environment.partial_reward: 'most': Input should be"),
    ],
)
def test_config_rules(overrides: list[str], expected: str) -> None:
    import yaml

    from trainer.config import ConfigError, parse_config

    raw = yaml.safe_load((REPO / "configs" / "quickstart_tau2.yaml").read_text())
    assert parse_config(raw).environment.score == "sum"
    with pytest.raises(ConfigError) as e:
        parse_config(raw, overrides)
    assert expected in e.value.render(), e.value.render()


def test_the_wheel_ships_the_built_in_domains_data() -> None:
    """``builtin:bookshop`` must work from an installed wheel (the Docker image installs one): pyproject's package
    data has to list the domain files (setuptools' glob: ``*`` stops at ``/``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "trainer"
    ]
    package = REPO / "trainer"
    shipped = {p.resolve() for pat in patterns for p in package.glob(pat) if p.is_file()}
    data = {p.resolve() for p in (package / "envs" / "domains").rglob("*") if p.suffix in (".json", ".md")}
    missing = sorted(str(p.relative_to(package.resolve())) for p in data - shipped)
    assert not missing, (
        f'add "envs/domains/*/*.json", "envs/domains/*/*.md" to package-data trainer: {missing}'
    )
