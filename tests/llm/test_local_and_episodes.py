"""The local backend, and IntentionGym / ``llm_judge`` over the real API: failures become invalid episodes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trainer.config.multiturn import ApiBackendConfig, EnvironmentConfig, JudgeConfig, LlmJudgeReward
from trainer.envs.intentiongym import IntentionGym
from trainer.envs.intentiongym_sample import write_sample
from trainer.llm import LoopThread, make_client
from trainer.llm.local import LocalClient
from trainer.rewards_llm import LlmJudge, parse_score
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.scripted import ScriptedClient
from trainer.testing.serve import TransformersServer

ASK = '<tool_call>{"name": "interact_with_env", "arguments": {"content": "What is your budget for the trip?"}}</tool_call>'


@pytest.fixture(scope="module")
def local_client(tiny_model: Path) -> LocalClient:
    client = make_client(
        ApiBackendConfig(backend="local", path=str(tiny_model), max_tokens=6), "user_simulator"
    )
    assert isinstance(client, LocalClient)
    return client


def test_local_backend_micro_batches(local_client: LocalClient, loop: LoopThread) -> None:
    batches: list[int] = []
    generate = local_client._generate

    def counting(conversations, temperature, max_tokens):
        batches.append(len(conversations))
        return generate(conversations, temperature, max_tokens)

    local_client._generate = counting  # type: ignore[method-assign]

    async def many() -> list:
        return await asyncio.gather(
            *(local_client.complete([{"role": "user", "content": f"question {i}"}]) for i in range(8))
        )

    results = loop.run(many())
    assert all(r.ok and isinstance(r.text, str) for r in results)
    assert all(r.prompt_tokens > 0 and 1 <= r.completion_tokens <= 6 for r in results)
    assert sum(batches) == 8 and len(batches) < 8  # concurrent calls shared generate() calls
    assert local_client.stats.snapshot()["api/calls"] >= 8


def test_local_greedy_is_deterministic(local_client: LocalClient, loop: LoopThread) -> None:
    a = loop.run(local_client.complete([{"role": "user", "content": "same"}], temperature=0))
    b = loop.run(local_client.complete([{"role": "user", "content": "same"}], temperature=0))
    assert a.text == b.text


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample(tmp_path_factory.mktemp("ig"), train=4, test=2)


def _row(env: IntentionGym) -> dict:
    intention = next(iter(env.intentions.values()))
    return {"prompt": [{"role": "user", "content": intention.task}], "reward_model": {"id": intention.id}}


def test_unparseable_api_verdict_is_invalid_not_zero(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, sample: dict[str, Path]
) -> None:
    # The tiny random model cannot write {"covered": [...]}: a real judge reply that does not parse.
    judge = make_client(
        JudgeConfig(model=server.model, api_base=proxy.url + "/v1", max_tokens=8, cache=False), "judge"
    )
    user = ScriptedClient(lambda m: "About 500 dollars.", role="user_simulator")
    cfg = EnvironmentConfig(
        name="intentiongym", intentions=str(sample["train_intentions"]), judge_backend="api"
    )
    env = IntentionGym.from_config(cfg, user, judge)
    episode = env.start(_row(env))
    step = loop.run(episode.step(ASK))
    assert step.done and step.reward is None and step.invalid and step.invalid.startswith("judge (openai/")
    assert "parse" in step.invalid
    result = episode.result()
    assert result.score is None and result.invalid == step.invalid
    assert judge.stats.snapshot()["api/failed"] == 1


def test_api_outage_makes_episodes_invalid_with_the_endpoint(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, sample: dict[str, Path]
) -> None:
    user = make_client(
        ApiBackendConfig(
            model=server.model, api_base=proxy.url + "/v1", retries=1, backoff_s=0.01, max_tokens=4
        ),
        "user_simulator",
    )
    cfg = EnvironmentConfig(
        name="intentiongym", intentions=str(sample["train_intentions"]), judge_backend="rule"
    )
    env = IntentionGym.from_config(cfg, user)
    proxy.script(*["server_error"] * 8)

    async def four() -> list:
        episodes = [env.start(_row(env)) for _ in range(4)]
        await asyncio.gather(*(e.step(ASK) for e in episodes))
        return [e.result() for e in episodes]

    results = loop.run(four())
    assert all(r.score is None and r.invalid and "user_simulator (openai/" in r.invalid for r in results)
    assert all("server 500" in r.invalid for r in results)
    assert user.stats.error_kinds() == {"server": 4}


def test_llm_judge_reward(server: TransformersServer, proxy: FaultProxy, loop: LoopThread) -> None:
    cfg = LlmJudgeReward(
        type="llm_judge", rubric="Rate this answer:\n{completion}\nto {prompt}", max_score=10
    )
    convo = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>easy</think>4"}]
    good = LlmJudge(cfg, ScriptedClient(['{"score": 7.5}']))
    s = loop.run(good.score(convo))
    assert s.value == pytest.approx(0.75) and s.raw == 7.5 and s.invalid is None
    assert s.record() == {
        "score": 7.5,
        "value": pytest.approx(0.75),
        "invalid": None,
        "reply": '{"score": 7.5}',
    }
    prompt = good.client.calls[0][1]["content"]  # type: ignore[attr-defined]
    assert prompt == "Rate this answer:\n4\nto 2+2?"
    judge = JudgeConfig(model=server.model, api_base=proxy.url + "/v1", cache=False, max_tokens=8)
    real = LlmJudge(cfg, make_client(judge, "judge"))
    s = loop.run(real.score(convo))
    assert s.value is None and s.invalid and "parse" in s.invalid  # never a fallback score
    assert s.record()["invalid"] == s.invalid and s.record()["score"] is None


def test_llm_judge_verdict_keeps_an_excerpt_of_the_reply(loop: LoopThread) -> None:
    """episodes.jsonl shows why a verdict did not parse: the judge's own words, cut at 300 characters."""
    cfg = LlmJudgeReward(type="llm_judge", rubric="Rate {completion}", max_score=10)
    rambling = "I would say this is quite good, maybe a seven. " * 20
    s = loop.run(LlmJudge(cfg, ScriptedClient([rambling])).score([{"role": "assistant", "content": "4"}]))
    assert s.invalid and s.value is None
    assert s.reply == rambling[:300] + "..." and s.record()["reply"] == s.reply


@pytest.mark.parametrize(
    ("text", "value"),
    [('{"score": 3}', 3.0), ('```json\n{"score": 0}\n```', 0.0), ('<think>hm</think>{"score": 10}', 10.0)],
)
def test_parse_score_accepts(text: str, value: float) -> None:
    assert parse_score(text, 0, 10) == value


@pytest.mark.parametrize(
    "text",
    [
        '{"score": 11}',
        '{"score": "7"}',
        '{"score": true}',
        "Score: 7",
        '{"score": 7, "why": "ok"}',
        "[7]",
        "NaN",
    ],
)
def test_parse_score_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_score(text, 0, 10)


def test_json_nan_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_score(json.dumps({"score": float("nan")}), 0, 10)
