"""Build a tiny random-initialised Qwen3-architecture model and a tokenizer trained on the fly.

No model hub is reachable where userloop is developed and tested, so the quickstart and the tests
use this model. It is saved with ``save_pretrained`` and loaded back through the same
``from_pretrained(path)`` code as a real Qwen3 checkpoint. The tokenizer is a byte-level BPE over
printable ASCII with a deliberately small vocabulary (a random policy over ~130 tokens still hits
a one-token answer often enough for RL to get a signal) and Qwen's ChatML special tokens and chat
template, so prompts are built exactly as for a real Qwen3 model.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
]

# ChatML as Qwen uses it; tools are listed in the system turn the way Qwen3's template does.
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{%- endif %}"
    "# Tools\n\nYou may call one or more functions. Function signatures:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    'For each call return <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message.role == 'system') %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    from trainer.tasks import sample_corpus

    printable = string.ascii_letters + string.digits + string.punctuation + " \n"
    return [printable] * 4 + sample_corpus()


def build_tokenizer(vocab_size: int = 160):
    """A byte-level BPE tokenizer trained on printable ASCII and the built-in tasks' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, head_dim: int | None = None
) -> dict:
    """Write a random-initialised Qwen3ForCausalLM and its tokenizer to ``out_dir``; return a summary.

    ``head_dim`` defaults to ``hidden_size // 4`` (4 heads); vLLM's CPU attention kernel refuses head
    dimensions below 32, so a model it serves needs ``head_dim=32`` (Qwen3 lets it exceed hidden/heads)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from trainer.model import quiet_libraries

    quiet_libraries()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
