"""PPO with a critic (Schulman et al. 2017; for language models as in Ouyang et al. 2022 and verl).

Where GRPO compares a prompt's completions with each other, PPO learns a value function and measures each
generated token against it. One step, top to bottom (``train``): take this process's prompts -> play
``group_size`` episodes each (``trainer.rollout``, the same runner as GRPO) -> put each episode's reward on
its last agent token (with ``algorithm.advantage: turn``, each turn's reward on that turn's last token) ->
the critic's values of the sampled states -> GAE advantages and returns over the agent's tokens
(``trainer.critic.gae``), advantages whitened over the step -> ``updates_per_batch`` passes of
``grad_accum`` micro-batches: GRPO's clipped policy loss (with its entropy and KL terms) plus
``value_loss_coef`` x the clipped value loss -> a policy and a critic optimizer step -> hand weights to the
engine -> log / eval / checkpoint (the critic and its optimizer in ``checkpoints/step_N/critic/``).

The step line reads like the PPO scripts our users know: ``PL`` policy loss, ``VL`` value loss, ``R``
reward, ``A`` mean advantage before whitening (positive: the critic underestimates), ``E`` entropy, ``LR``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from trainer.config.schema import RunConfig
from trainer.critic import (
    CRITIC,
    explained_variance,
    gae,
    load_critic,
    token_rewards,
    value_loss,
    values,
    whiten,
)
from trainer.errors import UserError
from trainer.grpo import (
    RolloutBatch,
    _prepare,
    _rollout_metrics,
    _should_stop,
    _summed,
    engine_logprobs,
    episode_runner,
    policy_loss,
    reference_model,
    trajectory_batch,
)
from trainer.parallel import clip_grad_norm
from trainer.rollout import Trajectory, write_samples
from trainer.session import Session, TrainResult


@dataclass
class PPOBatch(RolloutBatch):
    """A ``RolloutBatch`` with per-token advantages [B, T-1] and the critic's targets."""

    old_values: torch.Tensor | None = None  # [B, T-1] V(s_t) at sampling time (the value clip's centre)
    returns: torch.Tensor | None = None  # [B, T-1] GAE returns, the value regression targets


def train(cfg: RunConfig) -> TrainResult:
    session = Session.start(cfg)
    algo, tok = cfg.algorithm, session.tokenizer
    critic, critic_opt = _start_critic(session)
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

            # 2. Rewards on tokens, the critic's values, GAE.
            batch = _batch(trajectories, tok.pad_token_id, session.device)
            batch.engine_logp = engine_logprobs(trajectories, batch)  # logprob_diff, tis_cap
            with torch.no_grad():
                micro = batch.split(algo.grad_accum)
                batch.old_values = torch.cat(
                    [values(critic, mb.input_ids, mb.attention_mask) for mb in micro]
                )
            rewards = token_rewards(*_reward_positions(trajectories, per_turn=algo.advantage == "turn"),
                                    (len(batch), batch.loss_mask.shape[1]), session.device)  # fmt: skip
            raw_adv, batch.returns = gae(rewards, batch.old_values, batch.loss_mask, algo.gamma, algo.lam)
            # Whitened over this process's agent tokens (each rank's share of the step is a random sample of it).
            batch.advantages = whiten(raw_adv, batch.loss_mask)
            n_tokens = session.loss_denominator(float(batch.loss_mask.sum()))

            # 3. Policy and critic updates (the first pass's log-probs become the ratio's baseline, as in GRPO).
            t1 = time.perf_counter()
            micro = batch.split(algo.grad_accum)
            for _ in range(algo.updates_per_batch):
                step_stats: dict[str, float] = {}
                for i, mb in enumerate(micro):
                    pl, stats = policy_loss(session, mb, cfg, n_tokens, ref_model)
                    vl, vstats = value_loss(values(critic, mb.input_ids, mb.attention_mask), mb.old_values,
                                            mb.returns, mb.loss_mask, algo.value_clip, n_tokens)  # fmt: skip
                    session.backward(pl + algo.value_loss_coef * vl, sync=i == len(micro) - 1)
                    stats["loss/total"] += algo.value_loss_coef * vstats["loss/value"]
                    for k, v in {**stats, **vstats}.items():
                        step_stats[k] = step_stats.get(k, 0.0) + v
                grad_norm = session.optimizer_step()
                critic_norm = _critic_step(critic, critic_opt, algo.max_grad_norm)
            t_sync = time.perf_counter()
            session.engine.sync_weights(session.state.step + 1)
            t_sync = time.perf_counter() - t_sync
            t_update = time.perf_counter() - t1

            # 4. Metrics (averaged over processes), log, eval, checkpoint, stop.
            local = {**step_stats, **_rollout_metrics(trajectories, [], session.world),
                     **_value_metrics(raw_adv, batch), "grad_norm": grad_norm, "critic/grad_norm": critic_norm,
                     "time/generate_s": t_gen, "time/update_s": t_update,
                     "update/positions": algo.updates_per_batch * batch.input_ids.numel(), "time/weight_sync_s": t_sync}  # fmt: skip
            local.update(_summed(runner.step_metrics(trajectories), session.world))
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


def _start_critic(session: Session) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The critic and its optimizer, fresh or from the resumed checkpoint's ``critic/``; registered with the
    session so every checkpoint saves them."""
    cfg, algo = session.cfg, session.cfg.algorithm
    saved = session.resume_from / CRITIC if session.resume_from is not None else None
    if saved is not None and not saved.is_dir():
        raise UserError(f"checkpoint {session.resume_from}", "has no critic/ (written by a run without a critic)",
                        hint=f"start PPO in its own output_dir with model.path: {session.resume_from}/policy")  # fmt: skip
    model = load_critic(cfg, session.device, saved, place=not session.plan.fsdp)  # FSDP places it itself
    return session.add_model(CRITIC, model, lr=algo.critic_lr or algo.lr)


def _critic_step(critic: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
    params = [p for p in critic.parameters() if p.requires_grad]
    norm = clip_grad_norm(params, max_norm)  # the global norm under FSDP too
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _batch(trajectories: list[Trajectory], pad_id: int, device: torch.device) -> PPOBatch:
    """GRPO's collation (invalid episodes stay in with an all-zero mask), as a ``PPOBatch``."""
    base = trajectory_batch(
        trajectories, [None if t.reward is None else 0.0 for t in trajectories], pad_id, device
    )
    return PPOBatch(**{f.name: getattr(base, f.name) for f in fields(base)})


def _reward_positions(trajectories: list[Trajectory],
                      per_turn: bool) -> tuple[list[list[tuple[int, int]]], list[list[float]]]:  # fmt: skip
    """Which agent turns get which reward: every turn its own (``advantage: turn``), or the last turn the
    episode's total. Invalid episodes get none (their mask is all zero anyway)."""
    spans: list[list[tuple[int, int]]] = []
    rewards: list[list[float]] = []
    for t in trajectories:
        if t.reward is None:
            spans.append([])
            rewards.append([])
        elif per_turn:
            spans.append(t.turn_spans)
            rewards.append(t.turn_rewards)
        else:
            spans.append(t.turn_spans[-1:])
            rewards.append([t.reward])
    return spans, rewards


def _value_metrics(raw_adv: torch.Tensor, batch: PPOBatch) -> dict[str, float]:
    assert batch.old_values is not None and batch.returns is not None
    mask = batch.loss_mask
    n = float(mask.sum().clamp(min=1.0))
    return {
        "adv/mean": float((raw_adv * mask).sum()) / n,
        "adv/abs_mean": float((raw_adv.abs() * mask).sum()) / n,
        "value/mean": float((batch.old_values * mask).sum()) / n,
        "value/explained_variance": explained_variance(batch.old_values, batch.returns, mask),
    }
