"""The in-process engine samples exactly the distribution the config names (the loss scores that one)."""

from __future__ import annotations

import torch

from trainer.engines.base import SamplingParams
from trainer.engines.hf import HFEngine
from trainer.model import load_tokenizer


def test_should_disable_top_k_when_the_config_says_0_even_if_the_model_ships_one(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # Qwen3 checkpoints ship top_k 20 in generation_config.json; 1 makes a leak unmistakable (always argmax).
    model.generation_config.top_k = 1
    tok = load_tokenizer(tiny_model)
    engine = HFEngine(model, tok)
    torch.manual_seed(0)
    prompt = tok("The letter after c is", add_special_tokens=False)["input_ids"]
    out = engine.generate([prompt], 64, SamplingParams(max_new_tokens=1, temperature=1.0, top_k=0))[0]
    assert len({tuple(c.completion_ids) for c in out}) > 5  # a random tiny model spreads mass widely

    capped = engine.generate([prompt], 64, SamplingParams(max_new_tokens=1, temperature=1.0, top_k=1))[0]
    assert len({tuple(c.completion_ids) for c in capped}) == 1  # and a configured top_k still applies
