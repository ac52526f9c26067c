"""In-process rollout engine: batched ``model.generate`` on the trainer's own (unwrapped) model.

It shares the policy's parameters, so weights are always current and ``sync_weights`` is free. The
model is put in eval mode while sampling (no LoRA dropout) and restored afterwards.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from trainer.engines.base import Completion, SamplingParams
from trainer.model import unwrap


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and the generation config's: Qwen3 stops on <|im_end|> and <|endoftext|>, the
    tokenizer names only one. Every engine stops on the same ids."""
    configured = getattr(unwrap(model).generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(t for t in configured if t is not None)})


class HFEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_batch: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch  # sequences per generate call; bounds activation memory
        self.stop_ids = stop_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        try:
            flat = [p for p in prompts for _ in range(n)]
            out: list[Completion] = []
            for start in range(0, len(flat), self.max_batch):
                out += self._generate_batch(model, flat[start : start + self.max_batch], params)
        finally:
            model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, model, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        tok = self.tokenizer
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        # Left padding: every prompt ends at column `width`, where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        greedy = params.temperature == 0
        sampled = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            # 0 explicitly: None would fall back to the model's generation_config (Qwen3 ships top_k 20), and
            # the loss would score a different distribution from the one sampled.
            top_k=None if greedy else params.top_k,
            pad_token_id=pad,
            eos_token_id=self.stop_ids,
        )
        new = sampled[:, width:].tolist()  # one host copy for the whole batch
        stop = set(self.stop_ids)
        results = []
        for prompt, ids in zip(prompts, new, strict=True):
            end = next((i for i, t in enumerate(ids) if t in stop), None)
            finished = end is not None
            ids = ids[: end + 1] if finished else ids
            text = tok.decode(ids, skip_special_tokens=True)
            results.append(Completion(prompt_ids=prompt, completion_ids=ids, text=text, finished=finished))
        return results

    def sync_weights(self, step: int) -> None:
        return None
