"""tau2 episodes whose simulated customer (and NL judge) is a real OpenAI-compatible server (``transformers serve``).

A scripted agent plays each task's gold trajectory; the tiny served model plays the customer over HTTP, through
the fault proxy, as a relay would: its replies are random text, but every call, the roles it sees, the
episode's grading and the failure paths are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trainer.config.multiturn import EnvironmentConfig, JudgeConfig, UserSimulatorConfig
from trainer.envs.tau2 import Tau2Environment
from trainer.llm import LoopThread, make_client
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.serve import TransformersServer

TOOLS = "trainer.envs.domains.bookshop.tools:BookshopTools"


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture(scope="module")
def guidelines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short: the tiny served model generates nothing past its 1024-token context, and the default guidelines
    # plus a scenario are ~1400 of its tokens.
    path = tmp_path_factory.mktemp("tau2") / "guidelines.md"
    path.write_text("You are a customer. Follow the scenario. Write ###STOP### when your goal is reached.\n")
    return path


def env_for(server: TransformersServer, proxy: FaultProxy, guidelines: Path, **kw) -> Tau2Environment:
    # transformers serve samples only if the request's generation_config says so (the tiny model's own is greedy,
    # which writes newlines only): a customer that answers something.
    sample = {"generation_config": json.dumps({"do_sample": True})}
    user = make_client(UserSimulatorConfig(model=server.model, api_base=proxy.url + "/v1", max_tokens=8, retries=3,
                                           backoff_s=0.01, cache=False, extra_body=sample), "user_simulator")  # fmt: skip
    judge = kw.pop("judge", None)
    cfg = EnvironmentConfig(name="tau2", domain_dir="builtin:bookshop", tools=TOOLS, max_turns=8,
                            user_guidelines=str(guidelines), **kw)  # fmt: skip
    return Tau2Environment(cfg, user, judge)


async def gold_episode(env: Tau2Environment, task_id: str, closing: str = "###STOP###"):
    episode = env.start({"task_id": task_id})
    await episode.begin()
    # A turn the customer answers, then the gold tool calls, then the agent's stop.
    steps = [await episode.step("Could you tell me the email on your account?")]
    c = episode.task.criteria
    assert c is not None
    for a in c.actions:
        steps.append(await episode.step(call(a.name, **a.arguments)))
    steps.append(await episode.step(f"All done: {' '.join(c.communicate_info)} {closing}"))
    return episode, steps


def test_scripted_agent_completes_episodes_against_a_served_user_simulator(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, guidelines: Path
) -> None:
    env = env_for(server, proxy, guidelines)
    tasks = ["0", "8", "12", "16"]  # cancel, change address, return, status

    async def four():
        return await asyncio.gather(*(gold_episode(env, t) for t in tasks))

    done = loop.run(four())
    for (episode, steps), tid in zip(done, tasks, strict=True):
        result = episode.result()
        assert result.score == 1.0 and result.invalid is None and result.user_fault is None, (
            tid,
            steps[-1].info,
        )
        assert steps[-1].info["termination"] == "agent_stop" and result.info["tool_errors"] == 0
        # The served model's opening and its answer to the agent's question reached the agent.
        assert episode.messages[-1]["role"] == "user" and episode.messages[-1]["content"]
        assert steps[0].observation_from == "user_simulator" and steps[0].observation[0]["role"] == "user"
        assert [who for who, _ in episode.dialogue] == ["agent", "user", "agent", "user", "agent"]
    assert env.user.stats.snapshot()["api/calls"] == 2 * len(tasks)
    assert proxy.stats()["forwarded"] >= 2 * len(tasks)


def test_a_relay_outage_makes_episodes_invalid_never_zero(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, guidelines: Path
) -> None:
    env = env_for(server, proxy, guidelines)
    proxy.script(*["server_error"] * 8)  # the 2 openings x (1 + 3 retries)

    async def two():
        episodes = [env.start({"task_id": t}) for t in ("0", "1")]
        await asyncio.gather(*(e.begin() for e in episodes))
        return [e.result() for e in episodes]

    for r in loop.run(two()):
        assert r.score is None and r.user_fault is None and r.turns == 0
        assert r.invalid and "user_simulator (openai/" in r.invalid and "server 500" in r.invalid
    assert env.user.stats.error_kinds() == {"server": 2}


def test_an_nl_judge_reply_that_does_not_parse_is_invalid(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, guidelines: Path
) -> None:
    # The tiny served model cannot write {"results": [...]}: a real judge reply that does not parse.
    judge = make_client(JudgeConfig(model=server.model, api_base=proxy.url + "/v1", max_tokens=8, cache=False),
                        "judge")  # fmt: skip
    env = env_for(server, proxy, guidelines, judge=judge, nl_judge=True)
    episode, steps = loop.run(gold_episode(env, "20"))  # a refusal task with an NL assertion
    assert (
        steps[-1].invalid
        and steps[-1].invalid.startswith("nl judge: judge (openai/")
        and "parse" in steps[-1].invalid
    )
    assert episode.result().score is None
