"""``trainer.logprobs``: the same values and gradients as the plain log-softmax, without its float32 copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.logprobs import _TargetLogprobs, target_logprobs


def plain(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``token_logprobs`` computed before: float32 log-softmax, gather, entropy from it."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_in_loss", [False, True])
def test_values_and_gradients_match_the_plain_log_softmax(dtype, temperature, entropy_in_loss):
    torch.manual_seed(0)
    logits = (torch.randn(4, 9, 300) * 4).to(dtype)
    targets = torch.randint(0, 300, (4, 9))
    w_logp, w_ent = torch.randn(4, 9), torch.randn(4, 9)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()

    logp, ent = target_logprobs(a, targets, temperature)
    ref_logp, ref_ent = plain(b, targets, temperature)
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)

    loss = (logp * w_logp).sum() + ((ent * w_ent).sum() if entropy_in_loss else 0)
    ref_loss = (ref_logp * w_logp).sum() + ((ref_ent * w_ent).sum() if entropy_in_loss else 0)
    loss.backward()
    ref_loss.backward()
    assert a.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: both round the same float32 gradient once
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


def test_gradcheck_across_chunk_boundaries():
    torch.manual_seed(1)
    x = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    # 3 rows per chunk: 7 rows give chunks of 3, 3 and 1.
    assert torch.autograd.gradcheck(lambda x: _TargetLogprobs.apply(x, t, 0.8, 3)[:2], (x,))


def test_chunk_size_does_not_change_the_result():
    torch.manual_seed(2)
    x = torch.randn(10, 50)
    t = torch.randint(0, 50, (10,))
    outs = []
    for chunk in (1, 4, 10):
        xx = x.clone().requires_grad_()
        logp, ent, _ = _TargetLogprobs.apply(xx, t, 1.0, chunk)
        (logp.sum() + ent.sum()).backward()
        outs.append((logp.detach(), ent.detach(), xx.grad))
    for other in outs[1:]:
        for got, want in zip(other, outs[0], strict=True):
            torch.testing.assert_close(got, want)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass of ``fn()`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_backward_keeps_only_the_logits():
    """The point of the module: no float32 [N, V] tensor is kept for the backward pass (bf16 logits, as on GPU)."""
    logits = torch.randn(64, 4096).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 4096, (64,))
    logits_bytes = logits.untyped_storage().nbytes()

    def fused() -> None:
        logp, ent = target_logprobs(logits, targets, 0.7)
        logp.sum() + ent.sum()  # builds the graph: what it saves is counted

    def unfused() -> None:
        logp, ent = plain(logits, targets, 0.7)
        logp.sum() + ent.sum()  # builds the graph: what it saves is counted

    fused_saved, plain_saved = _saved_bytes(fused), _saved_bytes(unfused)
    assert fused_saved <= logits_bytes + 64 * 4 * 4, (fused_saved, logits_bytes)
    assert plain_saved >= 4 * logits_bytes  # at least two float32 copies: what this module avoids


@pytest.mark.parametrize("lora", [False, True])
def test_token_logprobs_on_a_model_match_the_plain_computation(tiny_model, monkeypatch, lora):
    """Only the trained positions' logits are computed (a multi-turn mask: agent, user, agent); the values and
    gradients equal the plain full-logits computation, and the fallback for models without a boolean
    ``logits_to_keep`` gives the same."""
    from transformers import AutoModelForCausalLM

    from trainer import logprobs
    from trainer.grpo import collate, token_logprobs

    def model():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model)
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(
                m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            )
        return m

    seqs = [[5, 6, 7, 8, 9, 20, 21, 22, 23], [5, 6, 10, 11]]
    masks = [[0, 0, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1]]
    batch = collate(seqs, masks, [1.0, -1.0], 0, "cpu")
    weights = torch.randn(batch.loss_mask.shape)

    def run(m, fn) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logp, ent = fn(m)
        ((logp + 0.1 * ent) * weights * batch.loss_mask).sum().backward()
        return logp.detach(), ent.detach(), [p.grad for p in m.parameters() if p.requires_grad]

    def reference(m):
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        return plain(logits, batch.input_ids[:, 1:], 0.9)

    seen: list[tuple[int, ...]] = []  # what the LM head computes on
    m = model()
    logprobs.output_head(m).register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    token_logprobs(m, batch, 0.9)
    assert seen == [(int(batch.loss_mask.sum()), 64)]  # the trained positions only, not [2, 9, hidden]
    ref_logp, ref_ent, ref_grads = run(model(), reference)
    compact = run(model(), lambda m: token_logprobs(m, batch, 0.9))
    mask = batch.loss_mask.bool()
    assert (compact[0][~mask] == 0).all() and (compact[1][~mask] == 0).all()
    torch.testing.assert_close(compact[0][mask], ref_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact[1][mask], ref_ent[mask], atol=1e-5, rtol=1e-5)
    for got, want in zip(compact[2], ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    monkeypatch.setattr(logprobs, "output_head", lambda m: None)  # a model without an LM head module
    fallback = run(model(), lambda m: token_logprobs(m, batch, 0.9))
    for got, want in zip(fallback, compact, strict=True):
        torch.testing.assert_close(got, want)


def test_a_micro_batch_without_trained_tokens_still_reaches_every_parameter(tiny_model):
    """All its episodes invalid (masked out): the loss is 0, but under DDP every parameter must get a gradient."""
    from transformers import AutoModelForCausalLM

    from trainer.grpo import collate, token_logprobs

    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = collate([[5, 6, 7, 8], [5, 6, 10]], [[0, 0, 0, 0], [0, 0, 0]], [1.0, -1.0], 0, "cpu")
    logp, ent = token_logprobs(m, batch, 1.0)
    ((logp + ent) * batch.loss_mask).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


def test_later_update_passes_reuse_the_first_pass_log_probs(tiny_model, make_config):
    """``updates_per_batch`` > 1 used to spend a separate no-grad forward on the sampling-time log-probs;
    the first pass's own (before any optimizer step) are the same numbers, and the update is unchanged."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.grpo import collate, policy_loss, token_logprobs

    cfg = load_config(make_config("reuse", algorithm__clip_range=0.05))
    seqs = [[5, 6, 7, 8, 9, 11], [5, 6, 10, 12], [5, 7, 9, 13, 14, 15], [5, 8, 9]]
    masks = [[0, 0] + [1] * (len(s) - 2) for s in seqs]

    def train_two_passes(precompute: bool) -> tuple[list[torch.Tensor], list[float]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        batch = collate(seqs, masks, [1.0, -1.0, 0.5, -0.5], 0, "cpu")
        if precompute:  # the old way: a separate forward before the first pass
            with torch.no_grad():
                batch.old_logp = torch.cat([token_logprobs(model, mb, 1.0)[0] for mb in batch.split(2)])
        micro = batch.split(2)
        clip = []
        for _ in range(2):
            stats_sum = 0.0
            for mb in micro:
                loss, stats = policy_loss(SimpleNamespace(model=model), mb, cfg, 10.0)
                loss.backward()
                stats_sum += stats["clip_frac"]
            opt.step()
            opt.zero_grad()
            clip.append(stats_sum)
        return [p.detach().clone() for p in model.parameters()], clip

    reused, clip_reused = train_two_passes(precompute=False)
    precomputed, clip_precomputed = train_two_passes(precompute=True)
    assert clip_reused[0] == 0 and clip_reused[1] > 0  # pass 2's ratio is against the pre-update policy
    assert clip_reused == pytest.approx(clip_precomputed)
    for a, b in zip(reused, precomputed, strict=True):
        torch.testing.assert_close(a, b)


def test_sft_response_nll_equals_the_cross_entropy_it_replaces(tiny_model):
    from transformers import AutoModelForCausalLM

    from trainer.sft import collate, response_nll

    ids, attn, mask = collate([([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([5, 6, 10], [0, 1, 1])], 0, "cpu")
    a, b = (AutoModelForCausalLM.from_pretrained(tiny_model) for _ in range(2))
    got = response_nll(a, ids, attn, mask)
    logits = b(input_ids=ids, attention_mask=attn).logits[:, :-1]
    want = (F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none") * mask).sum()
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)


def test_without_entropy_the_entropy_output_is_a_constant():
    logits = torch.randn(6, 40, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    logp, ent = target_logprobs(logits, targets, with_entropy=False)
    assert not ent.any()
    (logp.sum() + ent.sum()).backward()  # the zeros take no part in the gradient
    ref = logits.detach().clone().requires_grad_()
    plain(ref, targets, 1.0)[0].sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_float32_logits_are_not_modified_by_the_backward():
    """float32 logits at temperature 1 are worked on in the backward's chunks: never in place on the saved ones."""
    logits = torch.randn(5, 30, requires_grad=True)
    kept = logits.detach().clone()
    targets = torch.randint(0, 30, (5,))
    logp, ent = target_logprobs(logits, targets)
    first = torch.autograd.grad(logp.sum() + ent.sum(), logits, retain_graph=True)[0]
    second = torch.autograd.grad(logp.sum() + ent.sum(), logits)[0]
    torch.testing.assert_close(first, second)
    assert torch.equal(logits.detach(), kept)


def test_a_second_order_gradient_is_refused_not_silently_wrong():
    logits = torch.randn(3, 7, requires_grad=True)
    logp, _ = target_logprobs(logits, torch.randint(0, 7, (3,)))
    (g,) = torch.autograd.grad(logp.sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM",
                                  "GPT2LMHeadModel"])  # fmt: skip
def test_selected_logits_equal_the_full_logits_across_architectures(name):
    """Gemma 2 soft-caps and Cohere scales the head's output: element-wise, so it still applies to the kept rows."""
    import transformers

    from trainer.logprobs import selected_logits

    cls = getattr(transformers, name)
    cfg = cls.config_class(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_embd=32, n_layer=2, n_head=4,
                           max_position_embeddings=64, n_positions=64, pad_token_id=0, final_logit_softcapping=30.0,
                           logit_scale=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(1, 97, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    trained = torch.zeros(2, 8, dtype=torch.bool)
    trained[0, 2:4] = trained[0, 6:] = trained[1, 3:6] = True
    with torch.no_grad():
        got = selected_logits(model, ids, attention, trained)
        full = model(input_ids=ids, attention_mask=attention).logits[F.pad(trained, (0, 1))]
    assert got.shape == (int(trained.sum()), 97)
    torch.testing.assert_close(got, full)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a bf16 Accelerator here must neither meet nor leave behind the
    mixed_precision='no' one of the in-process training tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_full_fine_tuning_under_bf16_autocast_keeps_bf16_logits(tiny_model, fresh_accelerator_state):
    """On a GPU, full fine-tuning runs under accelerate's bf16 autocast, which also casts every output to float32:
    a float32 copy of the logits the loss would keep. ``autocast_only`` drops that cast and keeps the autocast
    (here on the CPU, where accelerate's bf16 autocast works the same way); the update is unchanged."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from trainer.grpo import collate
    from trainer.logprobs import selected_logits
    from trainer.session import autocast_only

    batch = collate([[5, 6, 7, 8, 9], [5, 6, 10]], [[0, 0, 1, 1, 1], [0, 0, 1]], [1.0, -1.0], 0, "cpu")
    trained = batch.loss_mask.bool()
    results = {}
    for strip in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)  # float32 master weights
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = accelerator.prepare(model)
        if strip:
            autocast_only(model, accelerator)
        logits = selected_logits(model, batch.input_ids, batch.attention_mask, trained)
        logp, _ = target_logprobs(logits, batch.input_ids[:, 1:][trained])
        logp.sum().backward()
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        results[strip] = (logits.dtype, logp.detach(), model.lm_head.weight.grad.clone())
    assert results[False][0] == torch.float32  # accelerate's cast
    assert results[True][0] == torch.bfloat16  # autocast kept, cast dropped
    torch.testing.assert_close(results[True][1], results[False][1])  # the same bf16 logits, read in float32
    torch.testing.assert_close(results[True][2], results[False][2], atol=1e-2, rtol=1e-2)
