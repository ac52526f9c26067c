"""Evaluation: greedy (or ``rollout.eval_temperature``) completions on validation rows, scored by the rewards.

``accuracy`` is the share of rows whose completion matches the answer (the configured ``accuracy``
reward's match mode, exact otherwise); ``reward`` the mean weighted reward. Used during training and
by ``launcher eval``.
"""

from __future__ import annotations

from typing import Any

from trainer.config.schema import AccuracyReward, RunConfig
from trainer.engines.base import RolloutEngine, SamplingParams
from trainer.rewards import Reward, accuracy, score


def evaluate_rows(engine: RolloutEngine, rows: list[dict[str, Any]], prompt_ids: list[list[int]],
                  cfg: RunConfig, rewards: list[Reward], batch: int = 64) -> dict[str, float]:  # fmt: skip
    """Sums over this process's rows: ``{"n", "reward_sum", "correct", "answered"}`` (reduce across ranks, then divide)."""
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.eval_temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
    )
    match = next((r.match for r in cfg.rewards if isinstance(r, AccuracyReward)), "exact")
    sums = {"n": 0.0, "reward_sum": 0.0, "correct": 0.0, "answered": 0.0}
    for start in range(0, len(rows), batch):
        chunk, ids = rows[start : start + batch], prompt_ids[start : start + batch]
        completions = [group[0] for group in engine.generate(ids, 1, params)]
        samples = [
            sample_args(row, c, cfg.rollout.max_new_tokens) for row, c in zip(chunk, completions, strict=True)
        ]
        totals, _ = score(rewards, samples) if rewards else ([0.0] * len(samples), {})
        sums["n"] += len(samples)
        sums["reward_sum"] += sum(totals)
        for s in samples:
            hit = accuracy(completion=s["completion"], answer=s["answer"], match=match)
            if hit is not None:
                sums["answered"] += 1
                sums["correct"] += hit
    return sums


def summarize(sums: dict[str, float]) -> dict[str, float]:
    n = max(1.0, sums["n"])
    out = {"eval/reward": sums["reward_sum"] / n, "eval/samples": sums["n"]}
    if sums["answered"]:
        out["eval/accuracy"] = sums["correct"] / sums["answered"]
    return out


def sample_args(row: dict[str, Any], completion, max_new_tokens: int) -> dict[str, Any]:
    """The keyword arguments every reward function receives."""
    return {
        "completion": completion.text,
        "prompt": row["prompt"],
        "answer": row["answer"],
        "row": row["row"],
        "num_tokens": len(completion.completion_ids),
        "max_new_tokens": max_new_tokens,
    }
