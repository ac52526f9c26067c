"""The GPU benchmark's arithmetic, checked on the CPU (benchmarks/gpu.py): the MFU figure it reports on a GPU
is model FLOPs / time / peak, so the FLOP count is what can be checked without a GPU. It is compared with
torch's ``FlopCounterMode`` over the forward and backward of a tiny Qwen3 with eager attention (which
computes every query-key pair, hence ``causal=False``). No timing is asserted."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.gpu import FULL, matmul_weights, model_flops, peak_tflops  # noqa: E402


def _tiny(vocab: int = 300):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                         attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return config, Qwen3ForCausalLM(config)


def _counted(model, input_ids, **kwargs) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        logits = model(input_ids=input_ids, **kwargs).logits
    loss = logits.float().logsumexp(-1).sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return float(fwd.get_total_flops()), float(bwd.get_total_flops())


@pytest.mark.parametrize("rows,width,keep", [(2, 12, None), (3, 20, 7)])
def test_model_flops_match_flop_counter_forward_and_backward(rows: int, width: int, keep: int | None) -> None:
    config, model = _tiny()
    ids = torch.randint(0, config.vocab_size, (rows, width))
    kwargs = {"logits_to_keep": keep} if keep else {}
    fwd, bwd = _counted(model, ids, **kwargs)
    ours = model_flops(config, [width] * rows, lm_head_positions=rows * keep if keep else None, causal=False)
    assert ours["forward"] == pytest.approx(fwd, rel=0.01)  # exact on transformers 5.23 / torch 2.13
    assert ours["total"] == pytest.approx(fwd + bwd, rel=0.01)
    assert ours["total"] == 3 * ours["forward"]


def test_matmul_weights_are_the_linear_layers() -> None:
    config, model = _tiny()
    layer, head = matmul_weights(config)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.0."))  # fmt: skip
    assert layer == linear
    assert head == model.lm_head.weight.numel()


def test_causal_attention_counts_half_the_pairs_and_full_size_shares() -> None:
    dims = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}  # fmt: skip
    full = model_flops(dims, [272] * 64, causal=False)["attention"]
    causal = model_flops(dims, [272] * 64)["attention"]
    assert causal / full == pytest.approx(273 / 2 / 272)
    layer, head = matmul_weights(dims)
    assert 28 * layer + head == pytest.approx(596e6, rel=0.01)  # Qwen3-0.6B: 596M parameters, tied head
    assert FULL.vocab_size == dims["vocab_size"] and FULL.layers == 28


def test_peak_by_device_name() -> None:
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some GPU", override=123.0) == 123.0
    with pytest.raises(SystemExit):
        peak_tflops("Some GPU")


def test_gpu_section_from_synthetic_runs() -> None:
    """The GPU-only path of the section (a device name, a peak, MFU in %) from made-up per-step figures."""
    from benchmarks.common import Timed
    from benchmarks.gpu import _steps_trl, _steps_userloop, section, summarize

    s = FULL
    dims = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}  # fmt: skip
    rows, width = s.batch_size * s.group_size, s.prompt_tokens + s.max_new_tokens
    tokens = rows * s.max_new_tokens
    ul = Timed(60.0, 0, extra={"time/step_s": [9.0, 5.0, 5.0, 5.0], "time/generate_s": [8.0, 4.5, 4.5, 4.5],
                               "time/update_s": [0.9, 0.2, 0.2, 0.2], "time/engine_busy_s": [8.0, 4.0, 4.0, 4.0],
                               "tokens": [tokens] * 4, "completion/finished": [0.0, 0.0, 1.0, 0.0],
                               "update/positions": [rows * width] * 2 + [float("nan"), rows * width]})  # fmt: skip
    fwd = [{"rows": rows // 2, "width": width, "scored": tokens // 2}] * 2
    trl = Timed(70.0, 0, extra={"step_s": [9.0, 6.0, 6.0, 6.0], "generate_s": [7.0, 5.0, 5.0, 5.0],
                                "gen_score_s": [7.5, 5.6, 5.6, 5.6], "tokens": [tokens] * 4,
                                "forwards": [fwd] * 4, "no_grad_forwards": 0})  # fmt: skip
    flops = model_flops(dims, [width] * rows, lm_head_positions=tokens)["total"]
    u = summarize([ul], _steps_userloop, s, dims, 989.4)
    t = summarize([trl], _steps_trl, s, dims, 989.4)
    assert u["per_run"][0]["steps"] == 2  # step 1 skipped (warm-up), step 3 logged no positions
    assert u["mfu"] == pytest.approx(flops / 0.2 / 989.4e12)
    assert u["update_tokens_per_s"] == pytest.approx(rows * width / 0.2)
    assert u["gen_tokens_per_s"] == pytest.approx(tokens / 4.0)
    assert t["update_s"] == pytest.approx(0.4) and t["mfu"] == pytest.approx(flops / 0.4 / 989.4e12)
    res = {"settings": {k: getattr(s, k) for k in s.__dataclass_fields__}, "threads": 16,
           "model": {"parameters": 596_049_920, "saved_dtype": "bfloat16"}, "gpu": "NVIDIA H200",
           "peak_tflops": 989.4, "results": {"userloop": u, "trl": t},
           "flops_per_step": model_flops(dims, [width] * rows, lm_head_positions=tokens), "machine": "m",
           "load": "0", "when": "now", "code": "c", "versions": "v"}  # fmt: skip
    text = section(res, "cmd")
    assert f"| userloop | {tokens / 4.0:.0f} |" in text
    assert f"{100 * u['mfu']:.1f} %" in text and "NVIDIA H200 (bf16 dense peak 989.4 TFLOP/s)" in text
