"""Episodes of a GRPO step: concurrent tasks on one event loop, micro-batched generation, per-token loss masks.

``EpisodeRunner.rollout(rows, n, params)`` plays ``n`` episodes per row and returns one ``Trajectory``
each. Every episode is an asyncio task on the run's ``LoopThread``; its turns alternate between

- generation: the episode's whole token sequence goes to the ``GenerationBatcher``, which collects
  the requests of all episodes waiting at that moment into one ``engine.generate`` call, run in a
  worker thread so the event loop keeps serving API replies meanwhile; and
- the environment: ``await episode.step(agent_text)`` (user simulator, coverage judge: API calls).

so while one episode waits for the API the engine generates for the others. An episode's judge
calls (``llm_judge`` rewards) start the moment it ends. Token-in/token-out: the agent's generated
ids enter the sequence verbatim with loss mask 1; the observation between turns is rendered by the
chat template (``TurnTemplate``) and enters with mask 0, as context.

``single_turn`` is the one-turn case: prompts are the session's pre-tokenised ones, the batcher sees
all ``batch x group`` requests at once and the result equals the foundation's single ``generate``
call (same sampling order, same numbers for the same seed).

Invalid episodes (an API call that failed after its retries, an unparseable judge reply) get
``reward=None``: the trainer excludes them from the loss and they are counted here
(``episodes/invalid``); too many in the window stops the run (``check_stop``).

``logs/episodes.jsonl`` (``write_samples``): two episodes of each training step, one JSON object each::

    step        the optimizer step whose rollout this episode was
    reward      the weighted total the trainer used (environment score + rewards + llm_judge); null: invalid
    invalid     why the episode could not be scored (excluded from the loss), else null
    turns       agent turns taken
    parts       each reward's raw value by name, the environment's score under its name; null: not applicable
    env         {"name", "score": environment.score (sum | mean | last), and the environment's result info
                (IntentionGym: task "id", details "covered" of "details"; tau2: "task_id", "termination",
                "tool_calls", "tool_errors", "tau2_reward", "breakdown", "user_fault")}
    turn_log    one entry per agent turn: "turn" (1-based), "reward" (the environment's turn reward; null for a
                turn it did not score: the agent ended, or the turn was invalid), "credit" (the turn's reward
                under algorithm.advantage: turn and PPO: its reward, the episode's other rewards added to the
                last turn; absent when invalid), and the environment's verdict (StepResult.info; IntentionGym:
                "question", "covered", "already_covered", "remaining", "judge", or "malformed"; an invalid
                turn has "invalid").
                parts[env.name] == aggregate(rewards of the scored turns, env.score)
    judges      {reward name: {"score": the judge's number, "value": normalised to [0, 1], "invalid", "reply":
                its raw reply (first 300 characters)}} for each llm_judge reward; {} without one
    messages    the conversation: "role" and "content" as given to the chat template, "from" (who wrote it:
                "prompt" for the dataset's messages, "agent", "user_simulator", "environment"), and on each
                observation "seen_as": the tokens the model got after its turn, decoded (end of its turn, the
                message as the template renders it, the next generation prompt). IntentionGym's user replies
                have role "tool": they answer the agent's interact_with_env call (also with text_action: ask,
                so the model sees one format); Qwen3's template shows them inside a user turn as
                <tool_response>...</tool_response>, the quickstart's tiny model as a "tool" turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config.multiturn import LlmJudgeReward, UserSimulatorConfig
from trainer.config.schema import RunConfig
from trainer.engines.base import Completion, RolloutEngine, SamplingParams
from trainer.envs import Environment, EpisodeResult, StepResult, make_environment
from trainer.envs.invalid import InvalidMonitor
from trainer.errors import UserError
from trainer.evaluate import sample_args
from trainer.llm import LLMClient, LoopThread, ResponseCache, make_client, merge_snapshots, open_cache
from trainer.llm.probe import check_endpoints
from trainer.llm.types import Message
from trainer.prompts import TurnTemplate, encode_chat
from trainer.rewards import Reward, score
from trainer.rewards_llm import LlmJudge

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Trajectory:
    """One episode as the trainer sees it. T = the episode's tokens (prompt, agent turns, observations)."""

    token_ids: list[int]  # [T]
    # [T] 1 on tokens the agent generated (trained), 0 on prompt and observations (context)
    loss_mask: list[int]
    reward: float | None  # weighted total of the rewards; None when the episode is invalid
    parts: dict[str, float | None]  # each reward's raw value by metric name; None where not applicable
    invalid: str | None  # why the episode cannot be scored (excluded from the loss)
    turns: int
    agent_tokens: int  # sum(loss_mask)
    finished: bool  # the last agent turn ended with the end token (not cut at max_new_tokens)
    malformed_actions: int = 0
    truncated: bool = False  # ended by environment.max_episode_tokens
    messages: list[Message] = field(default_factory=list)  # the conversation as text (judges, debugging)
    # [K] the [start, end) range of each agent turn in token_ids (K = agent turns generated)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    # [K] reward credited to each agent turn (``algorithm.advantage: turn``, PPO): the environment's turn reward
    # (0 where it scored none), the episode's other rewards (``rewards``, ``llm_judge``) added to the last turn.
    # Sums to ``reward`` when ``environment.score`` is ``sum`` and for ``single_turn``; [] when invalid.
    turn_rewards: list[float] = field(default_factory=list)
    # [T] the engine's log-prob of each agent token at sampling time (0 on context); None when the engine
    # reports none (HF). Compared with the trainer's own in ``rollout/logprob_diff``.
    engine_logprobs: list[float] | None = None
    # What logs/episodes.jsonl shows beyond the above (see write_samples; never read by the trainer):
    # [K] per agent turn: its environment reward, the verdict behind it (StepResult.info), the credit it got.
    turn_log: list[dict[str, Any]] = field(default_factory=list)
    # [len(messages)] who wrote each message ("from": prompt, agent, user_simulator, environment)
    message_info: list[dict[str, str]] = field(default_factory=list)
    # (message index, start, end): the context tokens token_ids[start:end] that followed an agent turn, filed under
    # the observation they carry; decoded by ``decode`` only when the episode is written ("seen_as").
    context_spans: list[tuple[int, int, int]] = field(default_factory=list)
    decode: Callable[[list[int]], str] | None = None
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)  # each llm_judge reward's verdict
    env_info: dict[str, Any] = field(default_factory=dict)  # environment name, score mode, its result's info
    # Why the user simulator spoiled the episode (tau2: broke role, leaked its goal, stopped early): excluded like an
    # invalid one (reward None, ``invalid`` says why) but counted in episodes/user_faults, not in the invalid rate.
    user_fault: str | None = None


class GenerationBatcher:
    """Micro-batches the generation requests of concurrent episodes into ``engine.generate`` calls.

    Episodes (on the event loop) queue requests; whenever the engine is free, everything queued becomes
    one batch (continuous batching at turn granularity). The batches run on the *calling* thread of
    ``drive`` (the training thread), never on the event loop, which keeps serving API replies meanwhile.
    Not a worker thread: on CPU, torch called from a second thread starts a second OpenMP pool whose
    spinning threads slow the training thread's own work threefold.

    ``busy_s`` is the engine's time in ``generate``; a rollout's wall time minus it is the time the
    engine sat idle waiting for the API (``time/engine_idle_s``).

    An engine with ``async agenerate(ids, params)`` (an HTTP server: SGLang) is awaited directly on the
    event loop instead: every episode's request is in flight at once (the engine bounds them) and the server
    batches; ``busy_s`` is then the time at least one request was in flight.
    """

    def __init__(self, engine: RolloutEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self._pending: list[tuple[list[int], SamplingParams, asyncio.Future[Completion]]] = []
        self._in_flight = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.busy_s = 0.0
        self.batches = 0
        self._agenerate = getattr(engine, "agenerate", None)
        self._requests = 0  # in flight through agenerate
        self._busy_since = 0.0

    async def generate(self, ids: list[int], params: SamplingParams) -> Completion:
        """One sample for ``ids`` (called from episode tasks on the event loop)."""
        if self._agenerate is not None:
            return await self._remote(ids, params)
        fut: asyncio.Future[Completion] = self.loop.create_future()
        self._pending.append((ids, params, fut))
        if not self._in_flight:
            self._in_flight = True
            # Scheduled behind the tasks already ready in this tick, so their requests join this batch.
            self.loop.call_soon(self._dispatch)
        return await fut

    async def _remote(self, ids: list[int], params: SamplingParams) -> Completion:
        if self._requests == 0:
            self._busy_since = time.perf_counter()
        self._requests += 1
        try:
            return await self._agenerate(ids, params)
        finally:
            self._requests -= 1
            if self._requests == 0:
                self.busy_s += time.perf_counter() - self._busy_since
                self.batches += 1

    def _dispatch(self) -> None:
        live = [p for p in self._pending if not p[2].done()]
        if not live:
            self._pending, self._in_flight = [], False
            return
        params = live[0][1]
        batch = [p for p in live if p[1] == params]
        self._pending = [p for p in live if p[1] != params]
        self._jobs.put((batch, params))

    def _deliver(self, batch: list, out: list[list[Completion]] | None, error: BaseException | None) -> None:
        for (_, _, fut), samples in zip(batch, out or [None] * len(batch), strict=True):
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(samples[0])
        self._in_flight = False
        if self._pending:
            self._in_flight = True
            self._dispatch()

    def drive(self, done: concurrent.futures.Future) -> None:
        """Run the engine for the episodes until ``done`` (the rollout's future) completes; call from the
        training thread."""
        done.add_done_callback(lambda _: self._jobs.put(None))
        while (job := self._jobs.get()) is not None:
            batch, params = job
            t0 = time.perf_counter()
            out, error = None, None
            try:
                out = self.engine.generate([b[0] for b in batch], 1, params)
            except Exception as e:  # a bug or out-of-memory, not an API problem: the episodes re-raise it
                error = e
            self.busy_s += time.perf_counter() - t0
            self.batches += 1
            self.loop.call_soon_threadsafe(self._deliver, batch, out, error)


class EpisodeRunner:
    """The run's event loop, environment, user-simulator and judge clients, and episode bookkeeping."""

    def __init__(
        self,
        cfg: RunConfig,
        engine: RolloutEngine,
        tokenizer: PreTrainedTokenizerBase,
        rewards: list[Reward],
        output_dir: str,
        seed: int = 0,
        clients: dict[str, LLMClient] | None = None,
    ):
        """``clients`` replaces the ``user_simulator`` / ``judge`` clients the config describes (tests)."""
        self._given = clients or {}
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.single_turn = cfg.environment.name == "single_turn"
        self.template = TurnTemplate(tokenizer) if not self.single_turn else None
        self.loop = LoopThread()
        self.batcher = GenerationBatcher(engine, self.loop.loop)
        self.clients: list[LLMClient] = []
        self.cache: ResponseCache | None = None
        try:
            self.cache = cache = open_cache(output_dir) if self._wants_cache() else None
            self.user = self._client(cfg.user_simulator, "user_simulator", cache, seed)
            self.judge = self._client(cfg.judge, "judge", cache, seed + 1)
            judge_rewards = [r for r in cfg.rewards if isinstance(r, LlmJudgeReward)]
            assert not judge_rewards or self.judge is not None  # the config validator requires the section
            self.judges: list[tuple[str, float, LlmJudge]] = [
                (r.name or r.type, r.weight, LlmJudge(r, self.judge))  # type: ignore[arg-type]
                for r in judge_rewards
            ]
            self.envs = {split: self._environment(split) for split in ("train", "val")}
            # A dead api_base or a wrong key stops the run here, before any step, naming the role and URL: an
            # agent that never calls the API tool would otherwise never notice (issue 12). Given clients are not.
            given = [id(c) for c in self._given.values()]
            self.loop.run(check_endpoints([c for c in self.clients if id(c) not in given]))
        except BaseException:
            self.close()
            raise
        sim, defaults = cfg.user_simulator, UserSimulatorConfig.model_fields
        self.monitor = InvalidMonitor(sim.max_invalid_rate if sim else defaults["max_invalid_rate"].default,
                                      sim.invalid_window if sim else defaults["invalid_window"].default)  # fmt: skip
        self._step: dict[str, float] = {}

    # ------------------------------------------------------------------ setup

    def _wants_cache(self) -> bool:
        # Only for clients built here from the config: with every client supplied (tests), opening one would
        # create <output_dir>/api_cache.sqlite for nothing (tests passing output_dir "unused" wrote it to the cwd).
        sections = (("user_simulator", self.cfg.user_simulator), ("judge", self.cfg.judge))
        return any(
            s is not None and s.backend == "api" and s.cache and role not in self._given
            for role, s in sections
        )

    def _client(self, section, role: str, cache, seed: int) -> LLMClient | None:
        if role in self._given:
            client = self._given[role]
        elif section is None:
            return None
        else:
            client = make_client(section, role, cache, seed)
        self.clients.append(client)
        return client

    def _environment(self, split: str) -> Environment:
        return make_environment(self.cfg.environment, user=self.user, judge=self.judge, split=split)

    def share_budgets(self, world: int) -> None:
        """Each of ``world`` processes spends its share: episodes are split evenly, so is the money."""
        for client in self.clients:
            if client.stats.budget is not None:
                client.stats.budget /= world

    def restore_api_stats(self, last_metrics: dict[str, Any] | None, world: int = 1) -> None:
        """Continue the cumulative API counters (and the budget) of a resumed run from its last logged step.

        The logged counters are totals over processes; each process takes back its ``1/world`` share so the
        totals stay right (and the budget is not spent ``world`` times).
        """
        if not last_metrics:
            return
        for client in self.clients:
            prefix = f"api/{client.stats.name}/"
            counts = {k[len(prefix) :]: round(v / world) for k, v in last_metrics.items()
                      if k.startswith(prefix) and "latency" not in k and k != prefix + "cost" and v is not None}  # fmt: skip
            cost = (last_metrics.get(prefix + "cost") or 0.0) / world
            client.stats.load_state_dict({"counts": counts, "cost": cost})

    # ------------------------------------------------------------------ rollouts

    def rollout(self, rows: Sequence[tuple[int, dict, list[int]]], n: int, params: SamplingParams,
                split: str = "train") -> list[Trajectory]:  # fmt: skip
        """``n`` episodes per ``(index, row, prompt_ids)``, in row-major order (a group's members are adjacent)."""
        env = self.envs[split]
        t0 = time.perf_counter()
        busy0 = self.batcher.busy_s
        episodes = [self._episode(env, row, ids, params) for _, row, ids in rows for _ in range(n)]
        done = self.loop.submit(self._gather(episodes))
        self.batcher.drive(done)  # generation runs here, on the training thread, until every episode ended
        trajectories = done.result()
        wall = time.perf_counter() - t0
        busy = self.batcher.busy_s - busy0
        if split == "train":
            for t in trajectories:
                self.monitor.add(None if t.user_fault else t.invalid)  # a simulator fault is no API failure
            self._step = {
                "time/rollout_s": wall,
                "time/engine_busy_s": busy,
                "time/engine_idle_s": max(0.0, wall - busy),
            }
        return trajectories

    @staticmethod
    async def _gather(coros: list) -> list[Trajectory]:
        return list(await asyncio.gather(*coros))

    async def _episode(
        self, env: Environment, row: dict, prompt_ids: list[int], params: SamplingParams
    ) -> Trajectory:
        episode = env.start(row)
        begin = getattr(episode, "begin", None)
        if begin is not None:  # an opening fetched by API (tau2: the simulated customer's first message)
            await begin()
        if not self.single_turn:  # the session's prompts carry no tool schemas
            prompt_ids = encode_chat(self.tokenizer, episode.messages, episode.tools)
        ids, mask = list(prompt_ids), [0] * len(prompt_ids)
        messages: list[Message] = list(episode.messages)
        info: list[dict[str, str]] = [{"from": "prompt"} for _ in messages]
        limit = self.cfg.environment.max_episode_tokens
        last: Completion | None = None
        truncated = False
        spans: list[tuple[int, int]] = []
        step_rewards: list[float] = []
        turn_log: list[dict[str, Any]] = []
        spans_seen: list[tuple[int, int, int]] = []
        logprobs: list[float] | None = [0.0] * len(ids)
        while not episode.done:
            if last is not None and len(ids) + params.max_new_tokens > limit:
                truncated = True  # scored on the turns so far, like an episode that ran out of turns
                break
            last = await self.batcher.generate(ids, params)
            spans.append((len(ids), len(ids) + len(last.completion_ids)))
            logprobs = None if logprobs is None or last.logprobs is None else logprobs + last.logprobs
            ids += last.completion_ids
            mask += [1] * len(last.completion_ids)
            text = (
                last.text
                if self.template is None
                else self.template.agent_text(last.completion_ids, last.finished)
            )
            messages.append({"role": "assistant", "content": text})
            info.append({"from": "agent"})
            step = await episode.step(text)
            step_rewards.append(step.reward or 0.0)
            turn_log.append(_turn_entry(len(spans), step))
            if step.done or self.template is None:
                break
            context = self.template.observation_ids(step.observation, last.completion_ids)
            if step.observation:
                # The role alone does not say what the model saw (Qwen3 wraps a tool message in a user turn).
                spans_seen.append(
                    (len(messages) + len(step.observation) - 1, len(ids), len(ids) + len(context))
                )
            ids += context
            mask += [0] * len(context)
            logprobs = None if logprobs is None else logprobs + [0.0] * len(context)
            messages += step.observation
            info += [{"from": step.observation_from} for _ in step.observation]
        result = episode.result()
        if last is None:  # the opening failed: no agent turn, nothing to train on
            return self._unplayed(prompt_ids, messages, info, result)
        reward, parts, invalid, judges = await self._score(row, result, messages, last, sum(mask))
        turn_rewards: list[float] = []
        if reward is not None:
            # The rest of the reward (`rewards`, judges; all of it for single_turn, whose step reward is None)
            # is the episode's outcome: credited to the last turn.
            env_part = 0.0 if self.single_turn else (result.score or 0.0)
            turn_rewards = [*step_rewards[:-1], step_rewards[-1] + reward - env_part]
        for entry, credit in zip(turn_log, turn_rewards, strict=False):
            entry["credit"] = credit
        env_cfg = self.cfg.environment
        env_info = {"name": env_cfg.name, "score": env_cfg.score, **result.info}
        return Trajectory(ids, mask, reward, parts, invalid, result.turns, sum(mask), last.finished,
                          result.malformed_actions, truncated, messages, user_fault=result.user_fault, turn_spans=spans,
                          turn_rewards=turn_rewards, engine_logprobs=logprobs, turn_log=turn_log,
                          message_info=info, context_spans=spans_seen, decode=self._decode, judges=judges,
                          env_info=env_info)  # fmt: skip

    def _unplayed(self, prompt_ids: list[int], messages: list[Message], info: list[dict[str, str]],
                  result: EpisodeResult) -> Trajectory:  # fmt: skip
        """An episode that ended before the agent's first turn: excluded (reward None), with its reason."""
        fault = f"user_fault: {result.user_fault}" if result.user_fault else None
        invalid = result.invalid or fault or "no agent turn"
        env_cfg = self.cfg.environment
        return Trajectory(list(prompt_ids), [0] * len(prompt_ids), None, {env_cfg.name: None}, invalid, 0, 0, False,
                          messages=messages, message_info=info, decode=self._decode, user_fault=result.user_fault,
                          engine_logprobs=[0.0] * len(prompt_ids),  # no sampled token: nothing to compare
                          env_info={"name": env_cfg.name, "score": env_cfg.score, **result.info})  # fmt: skip

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    async def _score(self, row: dict, result: EpisodeResult, messages: list[Message], last: Completion,
                     agent_tokens: int) -> tuple[float | None, dict[str, float | None], str | None,
                                                 dict[str, dict[str, Any]]]:  # fmt: skip
        """Weighted total of the environment's score, the sync ``rewards`` and the ``llm_judge`` rewards, and each
        judge's verdict (for episodes.jsonl)."""
        max_new = self.cfg.rollout.max_new_tokens
        if self.single_turn:
            sample = sample_args(row, last, max_new)  # exactly the foundation's reward arguments
        else:
            # Multi-turn: sync rewards see the agent's last reply; length is over all its turns and budget.
            reply = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
            sample = {**sample_args(row, last, max_new), "completion": reply, "num_tokens": agent_tokens,
                      "max_new_tokens": max_new * self.cfg.environment.max_turns}  # fmt: skip
        totals, raw = score(self.rewards, [sample]) if self.rewards else ([0.0], {})
        parts: dict[str, float | None] = {name: values[0] for name, values in raw.items()}
        total = totals[0]
        invalid = result.invalid or (f"user_fault: {result.user_fault}" if result.user_fault else None)
        judged: dict[str, dict[str, Any]] = {}
        if not self.single_turn:
            parts[self.cfg.environment.name] = result.score
            if result.score is not None:
                total += result.score
        if invalid is None and self.judges:
            answer = row.get("answer")
            verdicts = await asyncio.gather(*(judge.score(messages, answer) for _, _, judge in self.judges))
            for (name, weight, _), v in zip(self.judges, verdicts, strict=True):
                parts[name] = v.value
                judged[name] = v.record()
                if v.invalid is not None:
                    invalid = invalid or f"{name}: {v.invalid}"
                elif v.value is not None:
                    total += weight * v.value
        return (None if invalid else total), parts, invalid, judged

    # ------------------------------------------------------------------ metrics, evaluation, stopping

    def step_metrics(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Episode, engine-idle and API metrics of the step that just rolled out (see the README's metric table)."""
        m = dict(self._step)
        m.update(self.monitor.metrics())
        m["episodes/turns_mean"] = statistics.fmean(t.turns for t in trajectories)
        m["episodes/malformed_actions"] = float(sum(t.malformed_actions for t in trajectories))
        m["episodes/truncated"] = float(sum(t.truncated for t in trajectories))
        m["episodes/user_faults"] = float(sum(t.user_fault is not None for t in trajectories))
        m["episodes/tool_errors"] = float(sum(t.env_info.get("tool_errors", 0) for t in trajectories))
        if self.clients:
            m.update(merge_snapshots([c.stats for c in self.clients], reset_window=True))
            # The api/<role>/* counters also count a local model's generations: the step line and the plots
            # must not call those API calls.
            for c in self.clients:
                section = getattr(self.cfg, c.stats.name, None)
                if section is not None and section.backend == "local":
                    m[f"local/{c.stats.name}"] = 1.0
        return m

    def evaluate(self, rows: Sequence[tuple[int, dict, list[int]]], world_reduce) -> dict[str, float]:
        """One greedy (``rollout.eval_temperature``) episode per validation row: ``eval/reward`` over valid ones.

        ``world_reduce`` sums a dict of floats over processes."""
        r = self.cfg.rollout
        params = SamplingParams(r.max_new_tokens, r.eval_temperature, r.top_p, r.top_k)
        trajectories = self.rollout(rows, 1, params, split="val")
        valid = [t.reward for t in trajectories if t.reward is not None]
        sums = world_reduce({"n": float(len(valid)), "reward_sum": float(sum(valid)),
                             "invalid": float(len(trajectories) - len(valid))})  # fmt: skip
        out = {"eval/samples": sums["n"], "eval/invalid": sums["invalid"]}
        if sums["n"]:
            out["eval/reward"] = sums["reward_sum"] / sums["n"]
        return out

    def stop_reason(self) -> str | None:
        """``"invalid"`` when the invalid rate passed the limit, ``"budget"`` when an API budget is spent."""
        if self.monitor.exceeded():
            return "invalid"
        if any(c.stats.budget_exceeded for c in self.clients):
            return "budget"
        return None

    def invalid_error(self) -> UserError:
        return self.monitor.error([c.stats for c in self.clients])

    def budget_message(self) -> str:
        spent = [f"{c.stats.endpoint}: {c.stats.cost:.4g} of budget {c.stats.budget:.4g}"
                 for c in self.clients if c.stats.budget_exceeded]  # fmt: skip
        return (
            "API budget exceeded ("
            + "; ".join(spent)
            + "): checkpointing and stopping; raise the budget to resume"
        )

    def close(self) -> None:
        async def _close() -> None:
            for c in self.clients:
                await c.aclose()
            aclose = getattr(self.batcher.engine, "aclose", None)
            if aclose is not None:  # an HTTP engine's clients: the run's (on this loop), then its own
                await aclose()
                self.batcher.engine.close()

        try:
            self.loop.run(_close(), timeout=30)
        finally:
            self.loop.close()
            # The SQLite connection holds three descriptors (db, -wal, -shm) and, until closed, the newest
            # answers only in the -wal file: a run in a long-lived process (api.train) must not leave it open.
            if self.cache is not None:
                self.cache.close()
                self.cache = None


def _turn_entry(turn: int, step: StepResult) -> dict[str, Any]:
    """One ``turn_log`` entry of episodes.jsonl: the turn's environment reward and the environment's verdict."""
    entry: dict[str, Any] = {"turn": turn, "reward": step.reward, **step.info}
    if step.invalid is not None:
        entry["invalid"] = step.invalid
    return entry


def write_samples(path: str | Path, step: int, trajectories: Sequence[Trajectory], k: int = 2) -> None:
    """Append ``k`` conversations of a step to ``path`` (``logs/episodes.jsonl``): what the agent asked, what the
    simulated user answered, what each turn scored and why, the reward or why the episode was invalid. Reading
    them is how a bad relay, a confused user simulator or a reward bug shows up before the curves do. The schema
    of a record is in the module docstring."""
    with Path(path).open("a", encoding="utf-8") as f:
        for t in trajectories[:k]:
            messages = (
                [{**m, **i} for m, i in zip(t.messages, t.message_info, strict=True)]
                if len(t.message_info) == len(t.messages)
                else [dict(m) for m in t.messages]
            )
            if t.decode is not None:
                for i, start, end in t.context_spans:
                    messages[i]["seen_as"] = t.decode(t.token_ids[start:end])
            record = {"step": step, "reward": t.reward, "invalid": t.invalid, "turns": t.turns, "parts": t.parts,
                      "env": t.env_info, "turn_log": t.turn_log, "judges": t.judges,
                      "messages": messages}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
