"""Rollout engines: where completions come from. ``hf`` generates in-process; ``sglang`` and ``vllm`` ask a server."""

from __future__ import annotations

from collections.abc import Callable

from trainer.engines.base import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "build_engine"]


def build_engine(cfg, model, tokenizer, step: int = 0, any_rank: Callable[[bool], bool] | None = None,
                 hands_over: bool = True, tag: str = "r0") -> RolloutEngine:  # fmt: skip
    """The engine named by ``cfg.rollout.engine``, ready to sample from ``model``'s current weights.

    A server engine (SGLang, vLLM) waits for its server and hands it the weights (labelled ``step``) before
    returning; ``any_rank``/``hands_over``/``tag`` are its multi-process settings (see ``RemoteEngine``)."""
    if cfg.rollout.engine == "hf":
        from trainer.engines.hf import HFEngine

        return HFEngine(model, tokenizer)
    if cfg.rollout.engine in ("sglang", "vllm"):
        from trainer.engines.hf import stop_token_ids

        if cfg.rollout.engine == "sglang":
            from trainer.engines.sglang import SGLangEngine as Engine
        else:
            from trainer.engines.vllm import VLLMEngine as Engine

        engine = Engine(cfg, model, tokenizer, stop_token_ids(model, tokenizer), any_rank, hands_over, tag)
        try:
            engine.start(step)
        except BaseException:
            engine.close()
            raise
        return engine
    raise ValueError(f"unknown rollout engine {cfg.rollout.engine!r}")
