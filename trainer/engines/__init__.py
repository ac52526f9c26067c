"""Rollout engines: where completions come from. ``hf`` generates in-process; SGLang comes later."""

from trainer.engines.base import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "build_engine"]


def build_engine(cfg, model, tokenizer) -> RolloutEngine:
    """The engine named by ``cfg.rollout.engine``."""
    if cfg.rollout.engine == "hf":
        from trainer.engines.hf import HFEngine

        return HFEngine(model, tokenizer)
    raise ValueError(f"unknown rollout engine {cfg.rollout.engine!r}")
