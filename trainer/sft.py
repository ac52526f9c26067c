"""Supervised fine-tuning: causal-LM loss on the response tokens only (prompts and other turns masked).

One step: this process's rows -> right-padded (input_ids, loss_mask) -> ``grad_accum`` micro-batches
of token-level cross-entropy, normalised by the step's response tokens -> optimizer step -> log /
eval / checkpoint.
"""

from __future__ import annotations

import time

import torch

from trainer.config.schema import RunConfig
from trainer.errors import UserError
from trainer.logprobs import selected_logits, target_logprobs
from trainer.prompts import encode_sft
from trainer.session import Session, TrainResult


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """[B, T] input ids, [B, T] attention mask, [B, T-1] loss mask over target tokens."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, (seq, m) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids.to(device), attn.to(device), mask[:, 1:].to(device)


def response_nll(
    model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens (``mask`` [B, T-1] over targets), float32.

    Logits only at the response positions and no float32 copy of them (``trainer.logprobs``): with a
    152k-token vocabulary the full-width float32 cross-entropy held several GB per micro-batch.
    """
    trained = mask.bool()
    logits = selected_logits(model, ids, attn, trained)
    logp, _ = target_logprobs(logits, ids[:, 1:][trained], with_entropy=False)
    return -logp.sum()


def train(cfg: RunConfig) -> TrainResult:
    session = Session.start(cfg)
    tok = session.tokenizer
    examples = [encode_sft(tok, row, cfg.data.use_chat_template) for row in session.train_rows]
    if not any(sum(m) for _, m in examples):
        raise UserError(
            "data.train", "no response tokens to learn from", hint="check data.train.fields.response"
        )
    metrics: dict = {}
    for rows in session.batches():
        batch = [examples[i] for i, _, _ in rows]
        ids, attn, mask = collate(batch, tok.pad_token_id, session.device)
        n_tokens = session.loss_denominator(float(mask.sum()))
        t0 = time.perf_counter()
        total = 0.0
        size = -(-len(batch) // cfg.algorithm.grad_accum)
        chunks = list(range(0, len(batch), size))
        for j, i in enumerate(chunks):
            loss = (
                response_nll(session.model, ids[i : i + size], attn[i : i + size], mask[i : i + size])
                / n_tokens
            )
            session.backward(loss, sync=j == len(chunks) - 1)
            total += float(loss.detach()) * n_tokens / max(float(mask.sum()), 1.0)  # this rank's token mean
        grad_norm = session.optimizer_step()
        metrics = session.reduce_mean({
            "loss/sft": total,
            "grad_norm": grad_norm,
            "tokens": float(attn.sum()) * session.world,
            "time/update_s": time.perf_counter() - t0,
        })  # fmt: skip
        if session.end_step(metrics):
            break
    return session.finish(metrics)
