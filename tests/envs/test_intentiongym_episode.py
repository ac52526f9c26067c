"""IntentionGym episodes end to end with scripted LLM replies: rewards, endings, malformed actions, invalids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trainer.config.multiturn import EnvironmentConfig
from trainer.envs.intentiongym import IntentionGym
from trainer.testing.scripted import ScriptedClient


def ask(question: str) -> str:
    return json.dumps({"name": "interact_with_env", "arguments": {"content": question}}).join(
        ["<tool_call>", "</tool_call>"]
    )


def make_env(
    sample: dict[str, Path], user: ScriptedClient, judge: ScriptedClient | None = None, **kw
) -> IntentionGym:
    cfg = EnvironmentConfig(name="intentiongym", intentions=str(sample["train_intentions"]), **kw)
    return IntentionGym.from_config(cfg, user, judge)


def first_row(env: IntentionGym) -> dict:
    intention = next(iter(env.intentions.values()))
    return {"prompt": [{"role": "user", "content": intention.task}], "reward_model": {"id": intention.id}}


def run(coro):
    return asyncio.run(coro)


def test_rule_judge_episode_scores_by_importance(sample: dict[str, Path]) -> None:
    user = ScriptedClient(lambda m: "Sure, happy to tell you.", role="user_simulator")
    env = make_env(sample, user, judge_backend="rule", max_turns=10)
    episode = env.start(first_row(env))
    details = sorted(episode.intention.details, key=lambda d: -d.importance)

    async def play() -> list:
        steps = [await episode.step("<think>start broad</think>" + ask("Hello, how are you?"))]
        for d in details:
            steps.append(await episode.step(ask(d.inquiry)))
        return steps

    steps = run(play())
    assert steps[0].reward == 0.0 and steps[0].observation == [
        {"role": "tool", "content": "Sure, happy to tell you."}
    ]
    expected = [0.0] + [{3: 1.0, 2: 0.7, 1: 0.4}[d.importance] for d in details]
    assert [s.reward for s in steps] == pytest.approx(expected)
    assert steps[-1].done and steps[-1].observation == []  # all covered: nothing more to say
    assert not any(s.done for s in steps[:-1])
    result = episode.result()
    assert result.score == pytest.approx(sum(expected) / len(expected))
    assert result.turns == len(details) + 1 and result.invalid is None and result.malformed_actions == 0
    assert result.info["covered"] == result.info["details"] == len(details)
    with pytest.raises(RuntimeError):
        run(episode.step(ask("more?")))


def test_max_turns_ends_the_episode_without_asking_the_user(sample: dict[str, Path]) -> None:
    user = ScriptedClient(lambda m: "Hmm.")
    env = make_env(sample, user, judge_backend="rule", max_turns=2, score="sum")
    episode = env.start(first_row(env))
    detail = episode.intention.details[0]
    first = run(episode.step(ask("Nice weather?")))
    last = run(episode.step(ask(detail.inquiry)))
    assert not first.done and last.done and last.observation == []
    assert len(user.calls) == 1  # the last turn's reply would never be read
    assert episode.result().score == pytest.approx({3: 1.0, 2: 0.7, 1: 0.4}[detail.importance])


def test_malformed_action_gets_a_message_and_zero(sample: dict[str, Path]) -> None:
    env = make_env(sample, ScriptedClient(lambda m: "ok"), judge_backend="rule", max_turns=3)
    episode = env.start(first_row(env))
    for text, problem in [
        ("<tool_call>{oops}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "search", "arguments": {"content": "x"}}</tool_call>', "unknown tool 'search'"),
    ]:
        step = run(episode.step(text))
        assert step.reward == 0.0 and not step.done
        assert step.info["malformed"] and problem in step.info["malformed"]
        assert step.observation[0]["role"] == "tool" and problem in step.observation[0]["content"]
    step = run(episode.step(ask("   ")))
    assert step.done and "non-empty" in step.info["malformed"]
    result = episode.result()
    assert result.malformed_actions == 3 and result.score == 0.0 and result.invalid is None


def test_plain_text_ends_the_episode_unscored(sample: dict[str, Path]) -> None:
    env = make_env(sample, ScriptedClient(lambda m: "ok"), judge_backend="rule")
    episode = env.start(first_row(env))
    detail = episode.intention.details[0]
    run(episode.step(ask(detail.inquiry)))
    step = run(episode.step("Thanks, here is my plan."))
    assert step.done and step.reward is None and step.info["ended_by_agent"]
    assert episode.result().turn_rewards == [pytest.approx({3: 1.0, 2: 0.7, 1: 0.4}[detail.importance])]


def test_text_action_ask_makes_a_plain_reply_the_question(sample: dict[str, Path]) -> None:
    """``environment.text_action: ask``: plain text goes to the user and the judge as a tool call's content would."""
    user = ScriptedClient(lambda m: "Sure.", role="user_simulator")
    env = make_env(sample, user, judge_backend="rule", text_action="ask", max_turns=3)
    episode = env.start(first_row(env))
    detail = episode.intention.details[0]
    step = run(episode.step(f"<think>which first?</think>{detail.inquiry}"))
    assert not step.done and step.reward == pytest.approx({3: 1.0, 2: 0.7, 1: 0.4}[detail.importance])
    assert step.observation == [{"role": "tool", "content": "Sure."}]
    assert user.calls[-1][-1] == {"role": "user", "content": detail.inquiry}  # the think block is not asked
    step = run(episode.step("Hello!"))  # a question about nothing: scored 0, answered
    assert step.reward == 0.0 and not step.done
    step = run(episode.step("   "))  # an empty question is still malformed
    assert step.done and step.reward == 0.0 and episode.result().malformed_actions == 1
    assert len(user.calls) == 2  # none on the last turn


def test_api_judge_verdicts_and_prompts(sample: dict[str, Path]) -> None:
    user = ScriptedClient(lambda m: "I'd like the beach.")
    judge = ScriptedClient(['{"covered": [1, 2]}', '```json\n{"covered": []}\n```'])
    env = make_env(sample, user, judge, judge_backend="api")
    episode = env.start(first_row(env))
    remaining = list(episode.intention.details)
    step = run(episode.step(ask("Tell me everything?")))
    expected = max(0.0, {3: 1.0, 2: 0.7, 1: 0.4}[max(remaining[0].importance, remaining[1].importance)] - 0.2)
    assert step.reward == pytest.approx(expected)
    assert [d.description for d in episode.remaining] == [d.description for d in remaining[2:]]
    assert run(episode.step(ask("Anything else?"))).reward == 0.0
    # The judge saw only the details not yet covered; the user simulator knew all of them.
    assert remaining[0].description not in judge.calls[1][1]["content"]
    assert all(d.description in user.calls[0][0]["content"] for d in remaining)
    assert user.calls[1][-1] == {"role": "user", "content": "Anything else?"}


@pytest.mark.parametrize(
    "verdict",
    [
        "The question covers detail 1.",
        '{"covered": [99]}',
        '{"covered": "1"}',
        '{"covered": [1], "why": "x"}',
        "[1]",
    ],
)
def test_unparseable_verdict_makes_the_episode_invalid(sample: dict[str, Path], verdict: str) -> None:
    env = make_env(
        sample, ScriptedClient(lambda m: "fine"), ScriptedClient(lambda m: verdict), judge_backend="api"
    )
    episode = env.start(first_row(env))
    step = run(episode.step(ask("What is your budget?")))
    assert step.done and step.invalid and step.reward is None and step.observation == []
    result = episode.result()
    assert result.score is None and result.invalid == step.invalid  # never a zero reward
    assert "scripted" in result.invalid


def test_failed_user_call_makes_the_episode_invalid(sample: dict[str, Path]) -> None:
    user = ScriptedClient([ScriptedClient.FAIL], role="user_simulator")
    env = make_env(sample, user, judge_backend="rule")
    episode = env.start(first_row(env))
    step = run(episode.step(ask("What is your budget?")))
    assert step.invalid and "user_simulator" in step.invalid and "500" in step.invalid
    assert episode.result().score is None


def test_merged_mode_one_call_per_turn(sample: dict[str, Path]) -> None:
    user = ScriptedClient(['{"reply": "Next weekend.", "covered": [1]}', '{"reply": "", "covered": []}'])
    env = make_env(sample, user, judge_backend="api", merged=True)
    episode = env.start(first_row(env))
    first_importance = episode.intention.details[0].importance
    step = run(episode.step(ask("When?")))
    assert step.observation == [{"role": "tool", "content": "Next weekend."}]
    assert step.reward == pytest.approx({3: 1.0, 2: 0.7, 1: 0.4}[first_importance])
    assert len(user.calls) == 1 and '"covered"' in user.calls[0][0]["content"]
    bad = run(episode.step(ask("And?")))
    assert bad.invalid and "non-empty" in bad.invalid


def test_episodes_overlap_their_api_calls(sample: dict[str, Path]) -> None:
    user = ScriptedClient(lambda m: "ok", latency_s=0.2)
    judge = ScriptedClient(lambda m: '{"covered": []}', latency_s=0.2)
    env = make_env(sample, user, judge, judge_backend="api")
    episodes = [env.start(first_row(env)) for _ in range(8)]

    async def all_steps() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(*(e.step(ask("Budget?")) for e in episodes))
        return loop.time() - t0

    # 8 episodes x (user reply + verdict) at 0.2 s each: concurrent, so about one round trip in all.
    assert run(all_steps()) < 0.6


def test_turn_verdicts_name_the_matched_detail_and_a_repeat(sample: dict[str, Path]) -> None:
    """episodes.jsonl's turn_log comes from StepResult.info: which detail the rule judge matched and why, and
    that a question about a detail already covered scores 0 because of that."""
    env = make_env(sample, ScriptedClient(lambda m: "Sure."), judge_backend="rule", max_turns=3)
    episode = env.start(first_row(env))
    assert episode.intention.task == "Plan a weekend trip for me."  # the sample's first task
    question = "Would you rather go to the beach?"
    first = run(episode.step(ask(question)))
    assert first.observation_from == "user_simulator" and first.info["question"] == question
    assert first.reward == 1.0 and first.info["covered"] == ["Preferred type of destination"]
    assert first.info["judge"] == {
        "backend": "rule",
        "matched": {"Preferred type of destination": "option 'beach'"},
    }
    assert first.info["already_covered"] == [] and first.info["remaining"] == 3
    again = run(episode.step(ask(question)))
    assert again.reward == 0.0 and again.info["covered"] == [] and again.info["judge"]["matched"] == {}
    assert again.info["already_covered"] == ["Preferred type of destination"]
    malformed = run(episode.step("<tool_call>{oops}</tool_call>"))
    assert malformed.observation_from == "environment" and "not valid JSON" in malformed.info["malformed"]


def test_api_verdicts_keep_the_judges_raw_reply(sample: dict[str, Path]) -> None:
    judge = ScriptedClient(['{"covered": [1]}', "It covers the budget, I think."])
    env = make_env(sample, ScriptedClient(lambda m: "ok"), judge, judge_backend="api")
    episode = env.start(first_row(env))
    first_detail = episode.intention.details[0]
    step = run(episode.step(ask("What is your budget?")))
    assert step.info["judge"] == {"backend": "api", "reply": '{"covered": [1]}'}
    assert step.info["covered"] == [first_detail.description] and "already_covered" not in step.info
    bad = run(
        episode.step(ask("And the dates?"))
    )  # an unparseable verdict: invalid, with what the judge said
    assert bad.invalid and bad.info["judge"]["reply"] == "It covers the budget, I think."
    assert bad.info["question"] == "And the dates?"


def test_merged_verdicts_keep_the_raw_reply(sample: dict[str, Path]) -> None:
    user = ScriptedClient(['{"reply": "Next weekend.", "covered": [1]}'])
    env = make_env(sample, user, judge_backend="api", merged=True)
    step = run(env.start(first_row(env)).step(ask("When?")))
    assert step.info["judge"] == {"backend": "merged", "reply": '{"reply": "Next weekend.", "covered": [1]}'}
