"""Overlap benchmark: does the multi-turn rollout keep the engine busy while the API is slow?

N episodes x up to T turns of IntentionGym (user simulator and coverage judge over the API, an
``llm_judge`` reward at each episode's end), with an API latency of mean L injected by the fault proxy
(exponentially distributed: relays have long tails). Three numbers per L:

- ``ours``: ``EpisodeRunner.rollout`` (concurrent episodes, micro-batched generation, judge at episode end);
- ``sync``: the same work turn-synchronously: every turn, one generate batch for all live episodes,
  then all their API calls, waiting for the slowest; the end-of-episode judges after all generation;
- ``bound``: max(engine busy time, the longest single episode's chain of its generation + API waits +
  judge), measured in the ``ours`` run: no schedule can beat it.

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
from trainer.envs.intentiongym_sample import write_sample  # noqa: E402
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
                wall, chains, busy, batches = run_ours(runner, rows, group_size)
            finally:
                runner.close()
    bound = max(busy, max(c.total for c in chains))
    return {
        "latency_s": latency, "episodes": episodes, "turns_mean": statistics.fmean(c.turns for c in chains),
        "ours_s": wall, "sync_s": sync, "bound_s": bound, "ours_over_bound": wall / bound,
        "sync_over_ours": sync / wall, "engine_busy_s": busy, "engine_idle_s": max(0.0, wall - busy),
        "batches": batches,
    }  # fmt: skip


HEADING = "## Multi-turn overlap"
DOCS = REPO / "docs" / "benchmarks.md"


def section(results: list[dict[str, float]], episodes: int, turns: int) -> str:
    import os
    import platform

    lines = [
        HEADING,
        "",
        f"Rollout-and-judge phase of {episodes} IntentionGym episodes (up to {turns} turns; user simulator and "
        "coverage judge per turn, an `llm_judge` at each episode's end) with an exponentially distributed API "
        "latency of mean L injected by the fault proxy in front of an instant OpenAI-compatible stub; simulated "
        f"engine, {GEN_S:g} s per `generate` batch (`python benchmarks/multiturn_overlap.py --write`). "
        "*ours*: `EpisodeRunner.rollout`; *sync*: the same work turn-synchronously (each turn waits for the "
        "slowest reply, judges after all generation); *bound*: max(engine busy time, the longest episode's own "
        "chain of generation + API waits + judge). Targets: ours / bound <= 1.15, sync / ours several times at "
        f"L = 1 s. Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| L (s) | turns (mean) | ours (s) | sync (s) | bound (s) | ours / bound | sync / ours "
        "| engine idle (s) | generate batches |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines_after = [
        "",
        "Reading: *ours* stays within 1.15 of the bound at every latency: the engine works whenever an episode "
        "has a turn to generate, and the phase ends when the longest single conversation does. *sync / ours* is "
        "what overlap buys over waiting for the slowest reply each turn. It cannot exceed *sync / bound*, and with "
        "independent long-tailed latencies the longest episode's own chain (each turn's slower of two concurrent "
        "calls, then its judge) is long too, so the gain is well under the several-fold target: that needs a "
        "baseline that serialises more, such as upstream's user-then-judge calls one after the other (CONTEXT "
        "section 2); both schedules here make them concurrently. At L = 0.2 s the phase is CPU-bound, not "
        "latency-bound: a litellm call costs ~5-8 ms of Python (measured with this stub), the stub and the proxy "
        "share the benchmark's process and GIL, and ~500 calls then take seconds of CPU on 2 cores.",
    ]
    for r in results:
        lines.append(
            f"| {r['latency_s']:g} | {r['turns_mean']:.2f} | {r['ours_s']:.2f} | {r['sync_s']:.2f} | "
            f"{r['bound_s']:.2f} | {r['ours_over_bound']:.2f} | {r['sync_over_ours']:.2f} | "
            f"{r['engine_idle_s']:.2f} | {r['batches']} |"
        )
    return "\n".join(lines + lines_after) + "\n"


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
