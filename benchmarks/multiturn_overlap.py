"""Overlap benchmark: does the multi-turn rollout keep the engine busy while the API is slow?

N episodes x up to T turns of IntentionGym (user simulator and coverage judge over the API, an
``llm_judge`` reward at each episode's end), with an API latency of mean L injected by the fault proxy
(exponentially distributed: relays have long tails). Three numbers per L:

- ``ours``: ``EpisodeRunner.rollout`` (concurrent episodes, micro-batched generation, judge at episode end);
- ``sync``: the same work turn-synchronously: every turn, one generate batch for all live episodes,
  then all their API calls, waiting for the slowest; the end-of-episode judges after all generation;
- ``bound``: max(engine busy time, the longest single episode's chain of its generation + API waits +
  judge), measured in the ``ours`` run: no schedule can beat it;
- ``upstream``: what IntentionGym users run today, UserRL on verl (``UpstreamEnvironment``): episodes
  concurrent (verl's request-level SGLang rollout), but each turn awaits the user's reply and *then*
  the coverage judge (UserRL ``evaluate_question_async``), with upstream's 10 s timeout, no retries and
  a canned reply / no coverage on failure (counted); the episode-end judges after the whole rollout, one
  after another (verl's default ``NaiveRewardManager`` calls ``compute_score`` per item in a loop), and
  for comparison all at once (``upstream_conc``: the best a verl reward manager could do).

The API is real HTTP through litellm: a minimal OpenAI-compatible stub (instant, canned replies that
parse) behind the fault proxy, so the latency is the injected one and not a CPU model's. The engine is
simulated: ``GEN_S`` seconds per ``generate`` batch whatever its size, as a GPU decoding short turns.

    python benchmarks/multiturn_overlap.py                    # L in 0.2, 1, 3; writes nothing
    python benchmarks/multiturn_overlap.py --latency 1 --episodes 64 --turns 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import parse_config  # noqa: E402
from trainer.engines.base import Completion, SamplingParams  # noqa: E402
from trainer.envs import StepResult, parse_action  # noqa: E402
from trainer.envs.intentiongym import turn_reward  # noqa: E402
from trainer.envs.intentiongym_prompts import judge_messages, parse_reply, parse_verdict, user_messages  # noqa: E402
from trainer.envs.intentiongym_sample import write_sample  # noqa: E402
from trainer.llm import make_client  # noqa: E402
from trainer.rewards_llm import LlmJudge  # noqa: E402
from trainer.rollout import EpisodeRunner  # noqa: E402
from trainer.testing.fault_proxy import FaultPlan, FaultProxy  # noqa: E402
from trainer.tiny import build_tokenizer  # noqa: E402

GEN_S = 0.05  # simulated engine time per generate batch
PARAMS = SamplingParams(max_new_tokens=32, temperature=1.0)
QUESTION = '<tool_call>{"name": "interact_with_env", "arguments": {"content": "What else should I know?"}}</tool_call>'


# ----------------------------------------------------------------------------- the API stub


def _reply(messages: list[dict]) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if system.startswith("You judge which hidden details"):
        return '{"covered": [1]}'  # one more detail per question: episodes last as many turns as details
    if system.startswith("You are a strict evaluator"):
        return '{"score": 7}'
    return "Something simple, please."


class StubServer:
    """An instant OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1, in its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = _reply(body["messages"])
        return web.json_response({
            "id": "stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })  # fmt: skip

    def __enter__(self) -> StubServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            self.loop.run_until_complete(web.SockSite(self._runner, sock).start())
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


# ----------------------------------------------------------------------------- the engine and the timing


class SimulatedEngine:
    """Asks a question every turn; each ``generate`` call takes ``GEN_S`` whatever its batch size."""

    def __init__(self, tokenizer) -> None:
        self.ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.busy_s = 0.0
        self.batches = 0

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        time.sleep(GEN_S)
        self.busy_s += GEN_S
        self.batches += 1
        return [[Completion(p, list(self.ids), QUESTION, True)] for p in prompts]

    def sync_weights(self, step: int) -> None:
        return None


@dataclass
class Chain:
    """One episode's own critical path: its generations, its API waits, its judge."""

    turns: int = 0
    api_s: float = 0.0
    judge_s: float = 0.0

    @property
    def total(self) -> float:
        return self.turns * GEN_S + self.api_s + self.judge_s


_chain: contextvars.ContextVar[Chain] = contextvars.ContextVar("chain")


class TimedEnvironment:
    """Wraps an environment so each episode records the time its steps (API calls) took."""

    def __init__(self, env, chains: list[Chain]) -> None:
        self.env, self.chains = env, chains
        self.name, self.max_turns = env.name, env.max_turns

    def start(self, row: dict):
        chain = Chain()
        self.chains.append(chain)
        _chain.set(chain)  # the episode's task context: its judge call sees the same record
        return TimedEpisode(self.env.start(row), chain)


class TimedEpisode:
    def __init__(self, episode, chain: Chain) -> None:
        self.episode, self.chain = episode, chain
        self.messages, self.tools = episode.messages, episode.tools

    @property
    def done(self) -> bool:
        return self.episode.done

    async def step(self, text: str):
        t0 = time.perf_counter()
        try:
            return await self.episode.step(text)
        finally:
            self.chain.turns += 1
            self.chain.api_s += time.perf_counter() - t0

    def result(self):
        return self.episode.result()


class TimedJudge(LlmJudge):
    async def score(self, messages, answer=None):
        t0 = time.perf_counter()
        try:
            return await super().score(messages, answer)
        finally:
            chain = _chain.get(None)
            if chain is not None:
                chain.judge_s += time.perf_counter() - t0


# ----------------------------------------------------------------------------- upstream: UserRL on verl

# UserRL's IntentionGym (gyms/IntentionGym/intentiongym/env/prompts.py, ``generate_response_async``) answers a failed
# user call with one of five canned sentences and a failed coverage call with no coverage (reward 0).
UPSTREAM_CANNED = "That's an interesting question. Let me think about that."
UPSTREAM_TIMEOUT_S = 10.0  # AsyncOpenAI(...).create(timeout=model_config.get("timeout", 10)); no retry loop


class UpstreamEnvironment:
    """IntentionGym episodes stepped as UserRL's ``IntentionEnv.step_async`` does (see the module doc).

    The episode state and reward arithmetic are ours (the same rules); only the schedule and the failure
    handling are upstream's: reply, then coverage, each awaited; failures become a canned reply or no coverage."""

    def __init__(self, env, user, judge, fallbacks: dict[str, int]) -> None:
        self.env, self.user, self.judge, self.fallbacks = env, user, judge, fallbacks
        self.name, self.max_turns = env.name, env.max_turns

    def start(self, row: dict):
        return UpstreamEpisode(self, self.env.start(row))


class UpstreamEpisode:
    def __init__(self, env: UpstreamEnvironment, episode) -> None:
        self.env, self.ep = env, episode
        self.messages, self.tools = episode.messages, episode.tools

    @property
    def done(self) -> bool:
        return self.ep.done

    async def step(self, text: str) -> StepResult:
        ep, env = self.ep, self.env
        ep.turns += 1
        question = str(parse_action(text).arguments["content"])
        it = ep.intention
        # Step 1: the user's reply (asked on every turn, the last one too).
        res = await env.user.complete(
            user_messages(it.task, it.details, ep.transcript, question), parse=parse_reply
        )
        if not res.ok:
            env.fallbacks["user"] += 1
        reply = res.value if res.ok else UPSTREAM_CANNED
        # Step 2, only after the reply came back: which details the question covered.
        k = len(ep.remaining)
        res = await env.judge.complete(judge_messages(it.task, ep.remaining, question),
                                       parse=lambda t: parse_verdict(t, k))  # fmt: skip
        if not res.ok:
            env.fallbacks["judge"] += 1
        covered = res.value if res.ok else []
        newly = [ep.remaining[i] for i in covered]
        reward = turn_reward([d.importance for d in newly])
        ep.turn_rewards.append(reward)
        ep.remaining = [d for i, d in enumerate(ep.remaining) if i not in set(covered)]
        ep.transcript.append((question, reply))
        ep.done = ep.turns >= env.max_turns or not ep.remaining
        return StepResult([] if ep.done else [{"role": "tool", "content": reply}], reward, ep.done)

    def result(self):
        return self.ep.result()


def run_upstream(runner: EpisodeRunner, rows: list, group_size: int, seed: int = 7) -> dict[str, float]:
    """Rollout with ``UpstreamEnvironment``, then the episode-end judges one after another, then (timed apart)
    the same judges all at once. Clients with upstream's timeout and no retries, no cache."""
    cfg = runner.cfg
    fallbacks = {"user": 0, "judge": 0, "end_judge": 0}
    up = {"timeout_s": UPSTREAM_TIMEOUT_S, "retries": 0, "cache": False}
    user = make_client(cfg.user_simulator.model_copy(update=up), "user_simulator", None, seed)
    judge = make_client(cfg.judge.model_copy(update=up), "judge", None, seed + 1)
    envs, judges = dict(runner.envs), runner.judges
    runner.envs["train"] = UpstreamEnvironment(envs["train"], user, judge, fallbacks)
    runner.judges = []  # verl scores after the rollout, in its reward manager
    end_judge = LlmJudge(judges[0][2].cfg, judge)

    async def score(messages) -> None:
        if (await end_judge.score(messages)).invalid is not None:
            fallbacks["end_judge"] += 1

    async def one_by_one(transcripts) -> None:
        for messages in transcripts:
            await score(messages)

    async def all_at_once(transcripts) -> None:
        await asyncio.gather(*(score(m) for m in transcripts))

    try:
        t0 = time.perf_counter()
        trajectories = runner.rollout(rows, group_size, PARAMS)
        t_rollout = time.perf_counter() - t0
        transcripts = [t.messages for t in trajectories]
        runner.loop.run(one_by_one(transcripts))
        t_total = time.perf_counter() - t0
        t1 = time.perf_counter()
        runner.loop.run(all_at_once(transcripts))
        t_conc = time.perf_counter() - t1
    finally:
        runner.envs.update(envs)
        runner.judges = judges

        async def close() -> None:
            await user.aclose()
            await judge.aclose()

        runner.loop.run(close())
    return {"upstream_s": t_total, "upstream_rollout_s": t_rollout, "upstream_conc_s": t_rollout + t_conc,
            "upstream_fallbacks": sum(fallbacks.values())}  # fmt: skip


# ----------------------------------------------------------------------------- the two schedules


def config(data: dict[str, Path], api_base: str, turns: int, groups: int, group_size: int):
    api = {"model": "stub", "api_base": api_base, "max_concurrency": 512, "retries": 0, "timeout_s": 60,
           "max_tokens": 32, "cache": False}  # fmt: skip
    return parse_config({
        "name": "overlap-bench",
        "model": {"path": "unused"},
        "algorithm": {"name": "grpo", "batch_size": groups, "group_size": group_size},
        "data": {"train": {"path": str(data["train"])}, "max_prompt_tokens": 8192},
        "environment": {"name": "intentiongym", "intentions": str(data["train_intentions"]), "max_turns": turns,
                        "judge_backend": "api", "max_episode_tokens": 100000},
        "user_simulator": api,
        "judge": {**api, "temperature": 0.0},
        "rewards": [{"type": "llm_judge", "rubric": "Rate the questions: {conversation}"}],
    })  # fmt: skip


def run_ours(runner: EpisodeRunner, rows: list, group_size: int) -> tuple[float, list[Chain], float, int]:
    chains: list[Chain] = []
    runner.envs["train"] = TimedEnvironment(runner.envs["train"], chains)
    runner.judges = [(n, w, TimedJudge(j.cfg, j.client)) for n, w, j in runner.judges]
    engine = runner.batcher.engine
    busy0, batches0 = engine.busy_s, engine.batches
    t0 = time.perf_counter()
    trajectories = runner.rollout(rows, group_size, PARAMS)
    wall = time.perf_counter() - t0
    assert all(t.invalid is None for t in trajectories), [t.invalid for t in trajectories if t.invalid][:3]
    return wall, chains, engine.busy_s - busy0, engine.batches - batches0


def run_sync(runner: EpisodeRunner, rows: list, group_size: int) -> float:
    """Turn-synchronous: one batch per turn for all live episodes, then wait for all their API calls."""
    env = runner.envs["train"]
    engine = runner.batcher.engine
    judge = runner.judges[0][2]

    async def rollout() -> None:
        episodes = [env.start(row) for _, row, _ in rows for _ in range(group_size)]
        transcripts = [list(e.messages) for e in episodes]
        live = list(range(len(episodes)))
        while live:
            await asyncio.get_running_loop().run_in_executor(
                None, engine.generate, [[0]] * len(live), 1, PARAMS
            )
            steps = await asyncio.gather(*(episodes[i].step(QUESTION) for i in live))
            for i, step in zip(live, steps, strict=True):
                transcripts[i] += [{"role": "assistant", "content": QUESTION}, *step.observation]
            live = [i for i in live if not episodes[i].done]
        await asyncio.gather(*(judge.score(t) for t in transcripts))  # judges after all generation

    t0 = time.perf_counter()
    runner.loop.run(rollout())
    return time.perf_counter() - t0


def bench(latency: float, episodes: int, turns: int, group_size: int = 8) -> dict[str, float]:
    groups = episodes // group_size
    with tempfile.TemporaryDirectory() as tmp, StubServer() as stub:
        data = write_sample(tmp, train=groups, test=1, seed=0)
        plan = FaultPlan(latency_s=latency, latency_dist="exponential", seed=1)
        with FaultProxy(f"http://127.0.0.1:{stub.port}", plan) as proxy:
            cfg = config(data, proxy.url + "/v1", turns, groups, group_size)
            tok = build_tokenizer()
            from trainer.data import load_dataset

            rows = [(i, r, []) for i, r in enumerate(load_dataset(cfg.data, "train").rows)]
            runner = EpisodeRunner(cfg, SimulatedEngine(tok), tok, [], tmp)
            try:
                run_sync(runner, rows[:1], 2)  # warm-up: litellm's first call is slow
                sync = run_sync(runner, rows, group_size)
                upstream = run_upstream(runner, rows, group_size)
                wall, chains, busy, batches = run_ours(runner, rows, group_size)
            finally:
                runner.close()
    bound = max(busy, max(c.total for c in chains))
    return {
        "latency_s": latency, "episodes": episodes, "turns_mean": statistics.fmean(c.turns for c in chains),
        "ours_s": wall, "sync_s": sync, "bound_s": bound, "ours_over_bound": wall / bound,
        "sync_over_ours": sync / wall, "engine_busy_s": busy, "engine_idle_s": max(0.0, wall - busy),
        "batches": batches, **upstream, "upstream_over_ours": upstream["upstream_s"] / wall,
        "upstream_conc_over_ours": upstream["upstream_conc_s"] / wall,
    }  # fmt: skip


HEADING = "## Multi-turn overlap"
DOCS = REPO / "docs" / "benchmarks.md"


def section(results: list[dict[str, float]], episodes: int, turns: int) -> str:
    import os
    import platform

    at1 = next((r for r in results if r["latency_s"] == 1.0), results[-1])
    lines = [
        HEADING,
        "",
        f"Rollout-and-judge phase of {episodes} IntentionGym episodes (up to {turns} turns; user simulator and "
        "coverage judge per turn, an `llm_judge` at each episode's end) with an exponentially distributed API "
        "latency of mean L injected by the fault proxy in front of an instant OpenAI-compatible stub; simulated "
        f"engine, {GEN_S:g} s per `generate` batch (`python benchmarks/multiturn_overlap.py --write`). "
        "*ours*: `EpisodeRunner.rollout`; *sync*: the same work turn-synchronously (each turn waits for the "
        "slowest reply, judges after all generation); *bound*: max(engine busy time, the longest episode's own "
        "chain of generation + API waits + judge). Targets: ours / bound <= 1.15, several times faster than the "
        f"baseline at L = 1 s. Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}.",
        "",
        "| L (s) | turns (mean) | ours (s) | sync (s) | bound (s) | ours / bound | sync / ours "
        "| engine idle (s) | generate batches |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['latency_s']:g} | {r['turns_mean']:.2f} | {r['ours_s']:.2f} | {r['sync_s']:.2f} | "
            f"{r['bound_s']:.2f} | {r['ours_over_bound']:.2f} | {r['sync_over_ours']:.2f} | "
            f"{r['engine_idle_s']:.2f} | {r['batches']} |"
        )
    lines += [
        "",
        "Against what IntentionGym users run today, UserRL on verl (*upstream*, `UpstreamEnvironment` in the "
        "benchmark), same work, same stub, same simulated engine. What it models, from UserRL's code: the "
        "rollout is verl's request-level SGLang rollout (`verl/workers/rollout/sglang_rollout/"
        "sglang_rollout_customized.py`: every episode its own coroutine under `asyncio.Semaphore(128)`, "
        "generation by SGLang's continuous batching, here our batcher), so episodes already overlap each other; "
        "but a turn runs IntentionGym's `IntentionEnv.step_async` -> `evaluate_question_async` "
        "(`gyms/IntentionGym/intentiongym/env/prompts.py`), which awaits the user's reply and only then the "
        "coverage judge (two round trips per turn, the user asked on the last turn too), each an `AsyncOpenAI` "
        "call with `timeout=10` and no retry, a failure becoming a canned reply or no coverage (*fallbacks*: "
        "corrupted turns, 0 expected here as the stub never fails; the 10 s cut-off does bite the tail at L = 3 "
        "s). UserRL's IntentionGym has no episode-end LLM judge; a verl user adds one as a reward function, which "
        "verl's default `NaiveRewardManager` (`verl/workers/reward_manager/naive.py`) calls per episode in a "
        "loop after the whole rollout: *upstream* does that (one judge call after another); *upstream, judges "
        "concurrent* runs the same judges all at once after the rollout (what a custom batched reward manager "
        "could do), and *upstream rollout* is the rollout alone.",
        "",
        "| L (s) | ours (s) | upstream (s) | upstream rollout (s) | upstream, judges concurrent (s) "
        "| upstream / ours | upstream (judges concurrent) / ours | fallbacks |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['latency_s']:g} | {r['ours_s']:.2f} | {r['upstream_s']:.2f} | {r['upstream_rollout_s']:.2f} | "
            f"{r['upstream_conc_s']:.2f} | {r['upstream_over_ours']:.2f} | {r['upstream_conc_over_ours']:.2f} | "
            f"{r['upstream_fallbacks']:.0f} |"
        )
    lines += [
        "",
        "Reading: *ours* stays close to the bound: the engine works whenever an episode has a turn to generate, "
        "and the phase ends when the longest single conversation does. *sync / ours* is what overlap buys over "
        "waiting for the slowest reply each turn; it cannot exceed *sync / bound*, and with independent "
        "long-tailed latencies the longest episode's own chain is long too, so it stays under 2. Upstream is not "
        "turn-synchronous: it overlaps episodes as we do, so against it ours gains from (1) asking the user and "
        "the coverage judge together (one round trip per turn instead of two) and (2) starting an episode's judge "
        "the moment it ends instead of after the rollout. At L = 1 s: "
        f"{at1['upstream_over_ours']:.2f}x against upstream with verl's default one-by-one judging, "
        f"{at1['upstream_conc_over_ours']:.2f}x against upstream with concurrent judges; the first figure is "
        "dominated by the serial judge loop (one mean latency per episode), the second is the schedule alone. "
        "At L = 0.2 s the phase is CPU-bound, not latency-bound: a litellm call costs ~5-8 ms of Python, the "
        "stub and the proxy share the benchmark's process, and ~500 calls then take seconds of CPU on 2 cores.",
    ]
    return "\n".join(lines) + "\n"


def write(text: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (the other sections stay)."""
    import re

    doc = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    DOCS.write_text(doc, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, action="append", help="mean API latency in s (repeatable)")
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    results = []
    for latency in args.latency or [0.2, 1.0, 3.0]:
        results.append(bench(latency, args.episodes, args.turns))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = section(results, args.episodes, args.turns)
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
