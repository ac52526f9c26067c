"""Turn dataset rows into token ids: prompts for generation, prompt+response with a loss mask for SFT,
and the context tokens between the turns of a multi-turn episode.

Tokenisation happens once per dataset at start-up, not per step. With a chat template (the default),
prompts are rendered with ``add_generation_prompt=True`` exactly as the model sees them at inference.
Multi-turn episodes are token-in/token-out: the agent's generated ids are kept verbatim (never
decoded and re-encoded) and only the observations in between are rendered (``TurnTemplate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.errors import UserError


def check_chat_template(tokenizer: PreTrainedTokenizerBase, model_path: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"model.path: {model_path}",
            "the tokenizer has no chat template",
            hint="use an instruct/chat model's tokenizer, or set data.use_chat_template: false for raw prompts",
        )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], use_chat_template: bool
) -> list[int]:
    if use_chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_sft(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], use_chat_template: bool
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)``: 1 on the tokens the model must learn to produce (responses, their EOS)."""
    messages = row["prompt"]
    if row["response"] is not None:
        messages = [*messages, {"role": "assistant", "content": row["response"]}]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("data", "an SFT row has no response and no assistant message",
                        hint="map the response column with data.train.fields.response")  # fmt: skip
    ids: list[int] = []
    mask: list[int] = []
    # Render each assistant turn after the prefix before it: the tokens between the prefix (with the
    # generation prompt) and the full turn are exactly what the model generates, end token included.
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = encode_prompt(tokenizer, messages[:i], use_chat_template)
        if use_chat_template:
            full_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
            # ChatML ends a turn with "<|im_end|>\n": train up to the end token, not the newline after it.
            eos = tokenizer.eos_token_id
            end = (
                max(j for j, t in enumerate(full) if t == eos) + 1
                if eos in full[len(prefix) :]
                else len(full)
            )
        else:
            full = (
                prefix
                + tokenizer(m["content"], add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]
            )
            end = len(full)
        # Templates that rewrite earlier turns (Qwen3 drops <think> blocks of past assistant turns) break
        # this; refuse rather than train on a sequence the model never sees.
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise UserError("data", "the chat template does not render conversations as a growing prefix",
                            hint="set data.use_chat_template: false")  # fmt: skip
        ids += full[len(ids) : len(prefix)]  # context since the previous assistant turn
        mask += [0] * (len(ids) - len(mask))
        ids += full[len(prefix) : end]
        mask += [1] * (end - len(prefix))
    return ids, mask


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], tools: list[dict] | None = None
) -> list[int]:
    """A conversation's opening, with the tool schemas in the system turn, ready for the agent's first reply."""
    text = tokenizer.apply_chat_template(
        list(messages), tools=tools, tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class TurnTemplate:
    """The context tokens that follow an agent turn: its end-of-turn tail, the observation, the next generation prompt.

    They are cut out of the chat template's rendering of a dummy conversation ``[user, assistant, *observation]``
    right after the dummy assistant's content, so whatever the template does around a turn (ChatML's
    ``<|im_end|>\n``, Qwen3 wrapping tool results in ``<tool_response>`` inside a user turn) is reproduced
    without re-rendering, and so re-tokenising, the agent's own tokens. (Rendering the whole conversation again
    would not work: Qwen3's template drops the think block of every assistant turn but the last.)
    """

    _MARK = "\u2063agent-turn\u2063"  # content no template alters; its end is where the agent stopped

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token or ""

    def observation_ids(self, observation: Sequence[dict], completion_ids: Sequence[int]) -> list[int]:
        """Tokens to append after an agent turn whose generated ids are ``completion_ids``. A turn that did not end
        with the template's end token (cut at max_new_tokens, or stopped on another stop token such as Qwen3's
        ``<|endoftext|>``) gets that end token here, as context: the next turn then sees a well-formed history."""
        tok = self.tokenizer
        dummy = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._MARK}, *observation]
        text = tok.apply_chat_template(dummy, tokenize=False, add_generation_prompt=True)
        tail = text[text.find(self._MARK) + len(self._MARK) :] if self._MARK in text else ""
        if not self.eos_text or not tail.startswith(self.eos_text):
            raise UserError("model.path", "the chat template does not end an assistant turn with the tokenizer's "
                            f"end token {self.eos_text!r}, so agent turns cannot be kept token for token",
                            hint="use a chat model whose template closes turns with its EOS token (e.g. Qwen3)")  # fmt: skip
        ids = tok(tail[len(self.eos_text) :], add_special_tokens=False)["input_ids"]
        return ids if completion_ids[-1:] == [self.eos_id] else [self.eos_id, *ids]

    def agent_text(self, completion_ids: list[int], finished: bool) -> str:
        """The agent's reply as text for the environment: special tokens kept (``<tool_call>`` may be one), the
        stop token that ended it (``finished``) dropped."""
        ids = completion_ids[:-1] if finished else completion_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)
