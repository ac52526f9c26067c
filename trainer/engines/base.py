"""The rollout-engine contract.

An engine turns tokenised prompts into sampled completions. It works in token ids, not text, so the
trainer's loss masks and the engine's tokens always agree (no re-tokenisation of decoded text).
Implementations: ``HFEngine`` (in-process ``generate``, batched), ``SGLangEngine`` and ``VLLMEngine``
(HTTP clients of an SGLang or vLLM server, over ``trainer.engines.remote.RemoteEngine``). After each
optimizer step the trainer calls ``sync_weights`` so the next rollouts come from the new policy; an engine
that shares the trainer's model has nothing to do there.

An engine may also offer ``async agenerate(ids, params) -> Completion`` (one sample), which the episode
runner then awaits on its event loop for every episode at once instead of batching ``generate`` calls on
the training thread: the right shape for a server that batches concurrent requests itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when the model stopped by itself
    text: str  # decoded completion without special tokens
    finished: bool  # True when EOS was produced, False when cut at max_new_tokens
    logprobs: list[float] | None = field(default=None)  # per completion token, when the engine reports them


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """``n`` completions for each prompt: result[i][j] is the j-th sample of prompt i."""
        ...

    def sync_weights(self, step: int) -> None:
        """Make the next ``generate`` use the policy's current weights."""
        ...
