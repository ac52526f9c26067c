"""PPO's critic: a value head on a causal-LM backbone, GAE over the agent's tokens, the clipped value loss.

The critic is ``AutoModelForTokenClassification(num_labels=1)`` on ``algorithm.critic_path`` (default
``model.path``): the pretrained transformer without its LM head, plus a linear ``score`` head giving one
scalar per position (verl's critic is built the same way). It is saved with ``save_pretrained``, so a
checkpoint's ``critic/`` is a plain HF directory (or a LoRA adapter whose saved modules include the head).

Alignment: value ``V[:, t]`` is read at position t, the state *before* target token t+1 is generated, the
same positions as ``token_logprobs`` and ``RolloutBatch.loss_mask`` ([B, T-1]).

GAE (Schulman et al. 2016) runs over the agent's tokens only: observation and prompt tokens between two
agent turns are skipped (the next value is the next *agent* token's), so a multi-turn episode is one
trajectory whose steps are its generated tokens, with rewards at the end of each turn or of the episode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config.schema import RunConfig
from trainer.errors import UserError
from trainer.model import disable_dropout, resolve_dtype

# The critic's optimizer state sits next to its weights in checkpoints/step_N/critic/.
CRITIC = "critic"


def load_critic(cfg: RunConfig, device: torch.device, checkpoint_dir: Path | None = None,
                place: bool = True) -> torch.nn.Module:  # fmt: skip
    """The value model: fresh from ``critic_path``/``model.path`` (head zero-initialised), or a saved ``critic/``.

    LoRA on the policy means LoRA on the critic too (same rank and targets, the ``score`` head trained in
    full): the reason to pick LoRA, memory, applies to the critic's backbone as much as to the policy's.
    """
    from transformers import AutoModelForTokenClassification

    lora = cfg.model.lora
    source = cfg.algorithm.critic_path or cfg.model.path
    dtype = resolve_dtype(cfg.model.dtype, device, trains_all_weights=not lora.enabled)
    # A fixed seed for the LoRA matrices, forked so the run's RNG streams (sampling, resume) are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.algorithm.seed + 1)
        try:
            weights = checkpoint_dir if checkpoint_dir is not None and not lora.enabled else source
            model = AutoModelForTokenClassification.from_pretrained(weights, num_labels=1, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            field = "algorithm.critic_path" if cfg.algorithm.critic_path else "model.path"
            raise UserError(f"{field}: {source}", f"cannot load a critic backbone: {e}",
                            hint="point algorithm.critic_path at a full HF causal-LM directory") from None  # fmt: skip
        if checkpoint_dir is None:
            # A zero head predicts 0 for every state: no random value noise in the first advantages.
            torch.nn.init.zeros_(model.score.weight)
            if model.score.bias is not None:
                torch.nn.init.zeros_(model.score.bias)
        if lora.enabled:
            from peft import LoraConfig, PeftModel, get_peft_model

            if checkpoint_dir is not None:
                model = PeftModel.from_pretrained(model, checkpoint_dir, is_trainable=True)
            else:
                config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    target_modules=lora.target_modules, task_type="TOKEN_CLS",
                                    modules_to_save=["score"])  # fmt: skip
                model = get_peft_model(model, config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # The loss compares values of the same states across forwards; dropout noise would look like learning.
    disable_dropout(model)
    return (model.to(device) if place else model).train()  # FSDP (place=False) moves it layer by layer


def values(critic: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) for t = 0..T-2: [B, T-1] float32, aligned with ``token_logprobs``."""
    out = critic(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, 1]
    return out[:, :-1, 0].float()


def token_rewards(spans: list[list[tuple[int, int]]], rewards: list[list[float]], shape: tuple[int, int],
                  device: torch.device) -> torch.Tensor:  # fmt: skip
    """[B, T-1] rewards on target positions: ``rewards[i][k]`` at the last token of agent turn ``spans[i][k]``.

    ``spans`` are ``[start, end)`` token ranges in the sequence; token j is target position j-1.
    """
    out = torch.zeros(shape, dtype=torch.float32)
    for i, (turns, values_) in enumerate(zip(spans, rewards, strict=True)):
        for (_, end), r in zip(turns, values_, strict=True):
            out[i, end - 2] += r
    return out.to(device)


@torch.no_grad()
def gae(rewards: torch.Tensor, values_: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Generalised advantage estimates and returns over the masked (agent) positions, all [B, T-1].

    Unmasked positions carry the next agent token's value and advantage through unchanged (verl's
    multi-turn GAE does the same), so the discount counts agent tokens only; the value after the last agent
    token is 0 (the episode ended). Returns = advantages + values, the critic's regression targets.
    """
    next_value = torch.zeros_like(values_[:, 0])
    last_adv = torch.zeros_like(values_[:, 0])
    adv = torch.zeros_like(values_)
    for t in reversed(range(values_.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values_[:, t]
        here = delta + gamma * lam * last_adv
        adv[:, t] = here * m
        last_adv = here * m + last_adv * (1 - m)
        next_value = values_[:, t] * m + next_value * (1 - m)
    return adv, (adv + values_) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; zero elsewhere. A single token keeps its sign, scaled to 1."""
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_loss(new: torch.Tensor, old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
               n_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """PPO's clipped value loss, 0.5·max((V - R)², (clip(V, V_old ± clip) - R)²), summed over ``mask`` / ``n_tokens``.

    The clip keeps one batch from moving a value further than ``clip`` from its sampling-time estimate
    (Schulman et al. 2017's baselines; TRL's and verl's ``cliprange_value``).
    """
    clipped = old + (new - old).clamp(-clip, clip)
    unclipped_sq = (new - returns) ** 2
    clipped_sq = (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(unclipped_sq, clipped_sq) * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {
            "loss/value": float(loss),
            "value/clip_frac": float(((clipped_sq > unclipped_sq).float() * mask).sum() / n_tokens),
        }
    return loss, stats


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target) over the masked entries: 1 is a perfect critic, <= 0 no better than
    a constant."""
    n = mask.sum().clamp(min=1.0)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    v = var(target)
    return float(1 - var(target - pred) / v) if v > 1e-12 else 0.0
