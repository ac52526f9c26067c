"""GRPO (Shao et al. 2024, DeepSeekMath): sample a group per prompt, normalise rewards within the group,
clipped policy-gradient on the agent's tokens, optional KL to the reference and entropy bonus.

One step, top to bottom (``train``): take this process's prompts -> play ``group_size`` episodes each
(``trainer.rollout``: one reply for ``single_turn``, a conversation with a simulated user otherwise)
-> rewards -> group-normalised advantages over the valid episodes -> ``updates_per_batch`` passes of
``grad_accum`` micro-batches through ``policy_loss`` -> clip, optimizer step -> hand weights to the
engine -> log / eval / checkpoint -> stop when too many episodes were invalid or the API budget is spent.

A multi-turn episode is one token sequence; its loss mask selects the agent's tokens, so user and
environment tokens are context only. Invalid episodes (API failures, unparseable judges) carry no
reward: they are masked out and their group is normalised over the valid members.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, fields, replace

import torch

from trainer.config.schema import RunConfig
from trainer.engines.base import SamplingParams
from trainer.logprobs import selected_logits, target_logprobs
from trainer.metrics import read_metrics
from trainer.rollout import EpisodeRunner, Trajectory, write_samples
from trainer.session import Session, TrainResult


@dataclass
class RolloutBatch:
    """Right-padded sequences of one step. B = sequences, T = longest prompt+completion."""

    input_ids: torch.Tensor  # [B, T] prompt + completion tokens, padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    # [B, T-1] 1 where the *target* token (input_ids[:, 1:]) is an agent-generated token
    loss_mask: torch.Tensor
    # [B] one advantage per sequence (episode-level GRPO), or [B, T-1] one per target token (turn-level GRPO, PPO)
    advantages: torch.Tensor
    # [B, T-1] log-probs under the policy that sampled the batch; ``policy_loss`` fills it on the first pass
    old_logp: torch.Tensor | None
    # [B, T-1] the rollout engine's log-prob of each target token (0 off the loss mask); None when it reports none.
    # ``rollout/logprob_diff`` and truncated importance sampling (``algorithm.tis_cap``) compare ``old_logp`` with it.
    engine_logp: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, parts: int) -> list[RolloutBatch]:
        """``parts`` micro-batches of consecutive rows; every tensor field is sliced (subclasses add fields)."""
        size = -(-len(self) // parts)
        return [
            replace(self, **{f.name: _rows(getattr(self, f.name), i, size) for f in fields(self)})
            for i in range(0, len(self), size)
        ]


def _rows(value: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    return None if value is None else value[start : start + size]


def group_advantages(rewards: list[float | None], group_size: int, eps: float = 1e-6) -> list[float | None]:
    """(r - mean(group)) / std(group) over the group's valid members (reward not None); zero for a group whose
    valid rewards are all equal (no signal); None for invalid members and for every member of a group with
    fewer than two valid ones (nothing to compare against)."""
    out: list[float | None] = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g : g + group_size]
        valid = [r for r in group if r is not None]
        if len(valid) < 2:
            out += [None] * len(group)
            continue
        mean, std = statistics.fmean(valid), statistics.pstdev(valid)
        out += [None if r is None else 0.0 if std < eps else (r - mean) / std for r in group]
    return out


def turn_advantages(trajectories: list[Trajectory], group_size: int, gamma: float,
                    eps: float = 1e-6) -> list[list[float] | None]:  # fmt: skip
    """Turn-level credit (``algorithm.advantage: turn``): one advantage per agent turn of each episode.

    Each turn's return is the discounted sum of the turn rewards from that turn on, G_k = r_k + gamma * G_{k+1}
    (UserRL's reward-to-go over turns), and is normalised within its group *per turn position*: turn k of an
    episode is compared with turn k of the group's other valid episodes, (G_k - mean_k) / std_k. So a good
    first question is rewarded even in an episode whose later turns went badly, which the episode-level
    advantage (one number for all its turns) cannot do. A turn position that fewer than two valid members
    reached (the others ended earlier) has nothing to compare with: advantage 0. None: as ``group_advantages``.
    """
    returns: list[list[float] | None] = []
    for t in trajectories:
        if t.reward is None:
            returns.append(None)
            continue
        g, out = 0.0, []
        for r in reversed(t.turn_rewards):
            g = r + gamma * g
            out.append(g)
        returns.append(out[::-1])
    advantages: list[list[float] | None] = []
    for start in range(0, len(returns), group_size):
        group = returns[start : start + group_size]
        valid = [g for g in group if g is not None]
        if len(valid) < 2:
            advantages += [None] * len(group)
            continue
        stats = {}
        for k in range(max(len(g) for g in valid)):
            at_k = [g[k] for g in valid if len(g) > k]
            if len(at_k) >= 2:
                stats[k] = (statistics.fmean(at_k), statistics.pstdev(at_k))
        for g in group:
            if g is None:
                advantages.append(None)
                continue
            advantages.append([0.0 if k not in stats or stats[k][1] < eps else (gk - stats[k][0]) / stats[k][1]
                               for k, gk in enumerate(g)])  # fmt: skip
    return advantages


def collate(sequences: list[list[int]], masks: list[list[int]], advantages: list[float] | list[list[float]],
            pad_id: int, device) -> RolloutBatch:  # fmt: skip
    """Right-pad token sequences; ``masks[i][t]`` is 1 where token t of sequence i is trained.

    ``advantages[i]`` is one float per sequence, or a list with one value per token of sequence i (per-token
    advantages; shifted like the mask).
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width - 1), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(sequences, masks, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        # Target position t predicts token t+1, so the mask shifts left by one.
        mask[i, : len(s) - 1] = torch.tensor(m[1:], dtype=torch.float32)
    if advantages and isinstance(advantages[0], list):
        adv = torch.zeros((len(sequences), width - 1), dtype=torch.float32)
        for i, a in enumerate(advantages):
            adv[i, : len(a) - 1] = torch.tensor(a[1:], dtype=torch.float32)  # type: ignore[index]
    else:
        adv = torch.tensor(advantages, dtype=torch.float32)
    return RolloutBatch(ids.to(device), attn.to(device), mask.to(device), adv.to(device), None)


def trajectory_batch(trajectories: list[Trajectory], advantages: list[float | None] | list[list[float] | None],
                     pad_id: int, device) -> RolloutBatch:  # fmt: skip
    """Excluded episodes (advantage None) stay in the batch with an all-zero mask: every process then runs the
    same micro-batches (DDP needs that), and they add nothing to the loss or to its token count."""
    masks = [
        t.loss_mask if a is not None else [0] * len(t.loss_mask)
        for t, a in zip(trajectories, advantages, strict=True)
    ]
    if any(isinstance(a, list) for a in advantages):  # per turn (``turn_advantages``): spread over its tokens
        per_token = []
        for t, a in zip(trajectories, advantages, strict=True):
            values = [0.0] * len(t.token_ids)
            for (start, end), v in zip(t.turn_spans, a or [], strict=False):
                values[start:end] = [v] * (end - start)
            per_token.append(values)
        return collate([t.token_ids for t in trajectories], masks, per_token, pad_id, device)
    return collate([t.token_ids for t in trajectories], masks, [a or 0.0 for a in advantages], pad_id, device)


def engine_logprobs(trajectories: list[Trajectory], batch: RolloutBatch) -> torch.Tensor | None:
    """``RolloutBatch.engine_logp`` from the trajectories' per-token engine log-probs (shifted like the mask)."""
    if any(t.engine_logprobs is None for t in trajectories):
        return None
    out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
    for i, t in enumerate(trajectories):
        out[i, : len(t.token_ids) - 1] = torch.tensor(t.engine_logprobs[1:], dtype=torch.float32)
    return out.to(batch.loss_mask.device)


def token_logprobs(model, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the target tokens and the entropy of each position's distribution, both [B, T-1] float32;
    0 off the loss mask (only the trained positions' logits are computed)."""
    trained = batch.loss_mask.bool()
    logits = selected_logits(model, batch.input_ids, batch.attention_mask, trained)
    t = temperature if temperature > 0 else 1.0  # score the distribution the engine sampled from
    logp, entropy = target_logprobs(logits, batch.input_ids[:, 1:][trained], t)
    # masked_scatter keeps the graph through the model even for a micro-batch without trained tokens
    return tuple(x.new_zeros(trained.shape).masked_scatter(trained, x) for x in (logp, entropy))


def policy_loss(session: Session, batch: RolloutBatch, cfg: RunConfig, n_tokens: float,
                ref_model=None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Token-level GRPO loss summed over ``batch`` and divided by ``n_tokens`` (all completion tokens of the step)."""
    algo = cfg.algorithm
    logp, entropy = token_logprobs(session.model, batch, cfg.rollout.temperature)
    if batch.old_logp is None:  # first pass over this micro-batch: ratio 1, later passes reuse these
        batch.old_logp = logp.detach()
    old = batch.old_logp
    ratio = torch.exp(logp - old)
    adv = batch.advantages  # [B, T-1] per token, or [B] per sequence: broadcast over its tokens
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - algo.clip_range, 1 + algo.clip_range)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    tis_raw = None
    if batch.engine_logp is not None and algo.tis_cap is not None:
        # Truncated importance sampling (Yao et al. 2025): the engine sampled these tokens with its own
        # numerics (bf16, its kernels), not exactly the policy ``old`` scores. Weight each token by how much
        # likelier the trainer finds it than the engine did, capped so that a token the engine found far less
        # likely cannot dominate the step. [B, T-1], detached; 1 off the mask (both log-probs are 0 there).
        tis_raw = torch.exp(old - batch.engine_logp)
        pg = pg * tis_raw.clamp(max=algo.tis_cap)
    per_token = pg
    mask = batch.loss_mask
    if algo.entropy_coef > 0:
        per_token = per_token - algo.entropy_coef * entropy
    kl = torch.zeros_like(logp)
    if algo.kl_coef > 0:
        ref_logp = reference_logprobs(session, batch, cfg.rollout.temperature, ref_model)
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3 estimator (Schulman 2020): unbiased, always >= 0
        per_token = per_token + algo.kl_coef * kl
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {
            "loss/policy": float((pg * mask).sum() / n_tokens),
            "loss/total": float(loss),
            "entropy": float((entropy.detach() * mask).sum() / n_tokens),
            "kl": float((kl.detach() * mask).sum() / n_tokens),
            "clip_frac": float((((ratio - 1).abs() > algo.clip_range).float() * mask).sum() / n_tokens),
        }
        if batch.engine_logp is not None:  # ``old`` is the pre-update policy: it sampled these tokens
            stats["rollout/logprob_diff"] = float(((old - batch.engine_logp).abs() * mask).sum() / n_tokens)
        if tis_raw is not None:
            stats["rollout/tis_clip_frac"] = float(((tis_raw > algo.tis_cap).float() * mask).sum() / n_tokens)
    return loss, stats


@torch.no_grad()
def reference_logprobs(session: Session, batch: RolloutBatch, temperature: float, ref_model) -> torch.Tensor:
    if ref_model is not None:
        return token_logprobs(ref_model, batch, temperature)[0]
    # LoRA: the reference is the base model, i.e. the policy with its adapter switched off.
    with session.policy.disable_adapter():
        return token_logprobs(session.model, batch, temperature)[0]


def reference_model(session: Session):
    """The frozen model of the KL term: a second full copy; None without KL or with LoRA (adapter disabled)."""
    cfg = session.cfg
    if cfg.algorithm.kl_coef == 0 or cfg.model.lora.enabled:
        return None
    from trainer.model import load_reference

    return session.prepare_frozen(load_reference(cfg.model, session.device, place=not session.plan.fsdp))


def episode_runner(session: Session) -> tuple[EpisodeRunner, SamplingParams]:
    """The runner that plays this process's episodes, and the sampling parameters of training rollouts."""
    cfg = session.cfg
    runner = EpisodeRunner(cfg, session.engine, session.tokenizer, session.rewards, str(session.output_dir),
                           cfg.algorithm.seed + session.rank)  # fmt: skip
    r = cfg.rollout
    return runner, SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)


def train(cfg: RunConfig) -> TrainResult:
    session = Session.start(cfg)
    algo, tok = cfg.algorithm, session.tokenizer
    ref_model = reference_model(session)
    runner, params = episode_runner(session)
    try:
        _prepare(session, runner)
        metrics: dict = {}
        for rows in session.batches():
            # 1. Rollouts: group_size episodes per prompt, all concurrent.
            t0 = time.perf_counter()
            trajectories = runner.rollout(rows, algo.group_size, params)
            t_gen = time.perf_counter() - t0

            session.preemption_point()  # after SIGTERM: drop this step before it touches the weights

            # 2. Group-normalised advantages over the valid episodes: one per episode, or one per agent turn.
            if algo.advantage == "turn":
                advantages = turn_advantages(trajectories, algo.group_size, algo.turn_gamma)
            else:
                advantages = group_advantages([t.reward for t in trajectories], algo.group_size)
            batch = trajectory_batch(trajectories, advantages, tok.pad_token_id, session.device)
            batch.engine_logp = engine_logprobs(trajectories, batch)  # logprob_diff, tis_cap
            n_tokens = session.loss_denominator(
                float(batch.loss_mask.sum())
            )  # every token counts once, any rank

            # 3. Policy update(s). The first pass's log-probs are the sampling policy's (no step taken yet,
            # dropout off): ``policy_loss`` keeps them on each micro-batch as the later passes' ratio baseline.
            t1 = time.perf_counter()
            micro = batch.split(algo.grad_accum)
            for _ in range(algo.updates_per_batch):
                step_stats: dict[str, float] = {}
                for i, mb in enumerate(micro):
                    loss, stats = policy_loss(session, mb, cfg, n_tokens, ref_model)
                    session.backward(loss, sync=i == len(micro) - 1)
                    for k, v in stats.items():
                        step_stats[k] = step_stats.get(k, 0.0) + v
                grad_norm = session.optimizer_step()
            t_sync = time.perf_counter()
            session.engine.sync_weights(session.state.step + 1)
            t_sync = time.perf_counter() - t_sync
            t_update = time.perf_counter() - t1

            # 4. Metrics (averaged over processes), log, eval, checkpoint, stop.
            local = {**step_stats, **_rollout_metrics(trajectories, advantages, session.world), "grad_norm": grad_norm,
                     "time/generate_s": t_gen, "time/update_s": t_update,
                     "update/positions": algo.updates_per_batch * batch.input_ids.numel()}  # fmt: skip
            local.update(_summed(runner.step_metrics(trajectories), session.world))
            local["time/weight_sync_s"] = t_sync
            metrics = session.reduce_mean(local)
            if session.is_main and not runner.single_turn:
                write_samples(session.logger.logs / "episodes.jsonl", session.state.step + 1, trajectories)
            if session.end_step(metrics):
                break
            if _should_stop(session, runner):
                break
    finally:
        runner.close()
    return session.finish(metrics)


def _prepare(session: Session, runner: EpisodeRunner) -> None:
    """Continue the API counters on resume; evaluate with episodes (the data was checked in Session.start)."""
    runner.share_budgets(session.world)
    # Rank 0 truncates metrics.jsonl to the resumed step when its logger starts: read it after that.
    session.accelerator.wait_for_everyone()
    if session.state.step and session.logger.metrics_path.exists():
        last = next(iter(read_metrics(session.logger.metrics_path)[-1:]), None)
        runner.restore_api_stats(last, session.world)
    if not runner.single_turn:
        session.evaluator = lambda: _evaluate_episodes(session, runner)  # evaluation plays episodes too


def _evaluate_episodes(session: Session, runner: EpisodeRunner) -> dict[str, float]:
    rows = list(zip(range(len(session.val_rows)), session.val_rows, session.val_prompt_ids, strict=True))
    if session.cfg.eval.max_samples:
        rows = rows[: session.cfg.eval.max_samples]

    def total(sums: dict[str, float]) -> dict[str, float]:  # sums over processes
        return session.reduce_mean(_summed(sums, session.world, all_keys=True))

    return runner.evaluate(rows[session.rank :: session.world], total)


def _rollout_metrics(
    trajectories: list[Trajectory], advantages: list[float | None] | list[list[float] | None], world: int
) -> dict[str, float]:
    valid = [t.reward for t in trajectories if t.reward is not None]
    used = [x for a in advantages if a is not None for x in (a if isinstance(a, list) else [a])]
    out = {
        "reward/mean": statistics.fmean(valid) if valid else 0.0,
        "reward/std": statistics.pstdev(valid) if valid else 0.0,
        "adv/abs_mean": statistics.fmean(abs(a) for a in used) if used else 0.0,
        "completion/len_mean": statistics.fmean(t.agent_tokens for t in trajectories),
        "completion/finished": statistics.fmean(float(t.finished) for t in trajectories),
        "tokens": float(sum(t.agent_tokens for t in trajectories)) * world,
    }
    for name in dict.fromkeys(k for t in trajectories for k in t.parts):
        applicable = [v for t in trajectories if (v := t.parts.get(name)) is not None]
        if applicable:
            out[f"reward/{name}"] = statistics.fmean(applicable)
    return out


_SUMMED = ("episodes/invalid", "episodes/invalid_total", "episodes/malformed_actions", "episodes/truncated",
           "episodes/user_faults", "episodes/tool_errors")  # fmt: skip


def _summed(values: dict[str, float], world: int, all_keys: bool = False) -> dict[str, float]:
    """Counts to be summed, not averaged, over processes: scaled by ``world`` before ``reduce_mean``."""
    if world == 1:
        return values

    def is_count(k: str) -> bool:
        return all_keys or k in _SUMMED or (k.startswith("api/") and "latency" not in k)

    return {k: v * world if is_count(k) else v for k, v in values.items()}


def _should_stop(session: Session, runner: EpisodeRunner) -> bool:
    """Too many invalid episodes: checkpoint, then raise (exit 1). API budget spent: checkpoint, stop (exit 0)."""
    reason = runner.stop_reason()
    flags = session.reduce_mean({"invalid": float(reason == "invalid"), "budget": float(reason == "budget")})
    if not flags["invalid"] and not flags["budget"]:
        return False
    if session.saved_step != session.state.step:  # the same on every rank: save() is a collective
        session.save()
    session.wait_for_save()  # this step's checkpoint may still be writing in the background
    if flags["invalid"]:
        error = runner.invalid_error()
        session.logger.info(f"stopping: {error.render()}")
        session.logger.close()
        raise error
    session.logger.info(runner.budget_message())
    return True
