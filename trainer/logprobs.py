"""Log-prob and entropy of each trained token: logits only where a token is trained, reduced chunk by chunk.

The plain way (``log_softmax(logits.float())``, then ``gather`` and ``-(p * logp).sum()``) keeps several
float32 copies of the [B, T, V] logits alive for the backward pass: the up-cast, the temperature-scaled
copy, the log-softmax, ``exp`` and the product. With Qwen3's 151,936-token vocabulary one such copy is
~600 MB per 1,000 tokens, so those copies, not the model, set the micro-batch size a GPU can hold, and
their element-wise passes cost more time than the model's matmuls on short sequences. Here the forward
pass keeps only the logits (in the model's dtype) and one float32 log-sum-exp per token; the backward
recomputes the softmax one chunk of rows at a time and writes the gradient straight in the logits' dtype.
Before that, ``selected_logits`` has the model compute logits only at the positions whose next token is
trained: the LM head, a V x hidden matmul per position, skips prompts, the user's and the environment's
turns, and padding.

Gradients (z = logits / temperature, p = softmax(z), lse = logsumexp(z), H = -sum(p log p)):
  d logp[target] / dz = onehot(target) - p
  d H / dz            = -p (log p + H) = -p (z - lse + H)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.model import unwrap

# Rows per chunk: ~256 MB of float32 work space per temporary, whatever the vocabulary.
_CHUNK_BYTES = 256 * 2**20


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * vocab))


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int,
                with_entropy: bool = True):  # fmt: skip
        n, acc = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)
        logp = torch.empty(n, dtype=acc, device=logits.device)
        entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
        lse = torch.empty_like(logp)
        for s in range(0, n, chunk):
            z = logits[s : s + chunk].to(lse.dtype)
            if temperature != 1.0:
                z = z / temperature  # never in place: for float32 logits ``z`` is the saved input itself
            c = torch.logsumexp(z, dim=-1)
            lse[s : s + chunk] = c
            logp[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - c
            if with_entropy:  # from the log-softmax, not as lse - sum(p z): that cancels badly in float32
                logp_all = z - c[:, None]
                entropy[s : s + chunk] = -(logp_all.exp() * logp_all).sum(-1)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.set_materialize_grads(False)  # an unused output (entropy without a bonus) gets None, not zeros
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None, _g_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        g_entropy = g_entropy if ctx.with_entropy else None  # zeros were returned: a constant
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s : s + chunk]
            logp_all = x.to(lse.dtype)  # worked on in place below: must not be the saved logits themselves
            if temperature != 1.0:
                logp_all = logp_all / temperature
            elif logp_all.data_ptr() == x.data_ptr():
                logp_all = logp_all.clone()
            logp_all.sub_(lse[s : s + chunk, None])
            p = logp_all.exp()
            g = torch.zeros_like(p) if g_logp is None else p * -g_logp[s : s + chunk, None]
            if g_logp is not None:
                g.scatter_add_(-1, targets[s : s + chunk, None], g_logp[s : s + chunk, None])
            if g_entropy is not None:  # -p (log p + H) g_H, built in logp_all's storage
                g.sub_(
                    logp_all.add_(entropy[s : s + chunk, None]).mul_(g_entropy[s : s + chunk, None]).mul_(p)
                )
            if temperature != 1.0:
                g.div_(temperature)
            grad[s : s + chunk] = g
        return grad, None, None, None, None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``log softmax(logits / temperature)[target]`` and the entropy of that distribution (zeros without
    ``with_entropy``), both float32.

    ``logits`` [..., V] in any floating dtype, ``targets`` [...] token ids. Either output may take part in
    the loss; the backward pass never holds a float32 [..., V] tensor larger than one chunk.
    """
    shape, vocab = targets.shape, logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # a view: model logits are contiguous
    logp, entropy, _ = _TargetLogprobs.apply(
        flat, targets.reshape(-1), float(temperature), _rows_per_chunk(vocab), with_entropy
    )
    return logp.view(shape), entropy.view(shape)


def selected_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    trained: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits [n, V] of the n positions whose *next* token is trained (``trained`` [B, T-1] bool, row-major order).

    A pre-hook on the model's output embedding (the LM head) hands it only those positions' hidden states,
    whatever the transformers version (its boolean ``logits_to_keep`` is recent) and whatever wraps the model
    (DDP, PEFT, accelerate's autocast): what the model does after the head (Gemma's soft-capping, Cohere's
    scale) is element-wise and still applies. A model without an output embedding module gets full logits.
    """
    positions = F.pad(trained, (0, 1))  # [B, T]: position t predicts token t+1, the last one predicts none
    head = output_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions]

    def keep_trained(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        if hidden.shape[:2] != positions.shape:
            raise RuntimeError(f"the LM head of {type(unwrap(model)).__name__} got hidden states of shape "
                               f"{tuple(hidden.shape)}; expected [{', '.join(map(str, positions.shape))}, hidden]")  # fmt: skip
        return (hidden[positions], *rest)

    handle = head.register_forward_pre_hook(keep_trained)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != int(positions.sum()):
        raise RuntimeError(f"{type(unwrap(model)).__name__} returned logits of shape {tuple(logits.shape)} from "
                           "its LM head's selected positions; expected [positions, vocabulary]")  # fmt: skip
    return logits


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head of the causal LM under ``model`` (DDP and PEFT wrappers unwrapped), if it has one."""
    lm = unwrap(model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None
