"""The memory model (``trainer.config.memory``) and the strategy choice (``trainer.config.parallel``).

What they prove: parameter counts from ``config.json`` equal the real models' (and LoRA's equal peft's); the
per-GPU bytes follow the plan's precision and sharding; ``launcher render`` refuses a plan that cannot fit the
cluster's GPUs, naming changes that would (each estimated), and accepts it once changed; the GPU's memory is
read from ``cluster.gpu_memory_gb`` or the node selector; ``auto`` picks FSDP where users expect it; and the
estimate stays close above the measured peak of tensor memory on the CPU (``benchmarks/memory_model.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from trainer.config import load_config
from trainer.config.memory import GIB, KNOWN_SHAPES, estimate, gpu_memory_gb, model_shape, shape_from_config
from trainer.config.parallel import ParallelConfig, resolve_strategy

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart_single_turn.yaml")
runner = CliRunner()
# Qwen3-8B full fine-tuning on one pod of 8 x 80 GB GPUs, SGLang on 2 of them: a plan users write.
QWEN8B = ["model.path=/pvc/models/Qwen3-8B", "model.create_if_missing=null", "data.generate=null",
          "cluster.gpus_per_node=8", "cluster.rollout_gpus_per_node=2", "rollout.engine=sglang",
          "cluster.gpu_memory_gb=80", "algorithm.lr=1e-6", "data.max_prompt_tokens=512",
          "rollout.max_new_tokens=512", "algorithm.batch_size=6", "algorithm.group_size=4"]  # fmt: skip


def _cfg(*sets: str):
    return load_config(CONFIG, list(sets))


def test_parameter_counts_match_the_models(tiny_model: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape, _ = model_shape(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                              LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))  # fmt: skip
        assert shape.lora_params(4, targets) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    untied = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        real = sum(p.numel() for p in Qwen3ForCausalLM(untied).parameters())
    assert shape_from_config(untied.to_dict()).params == real
    # The published sizes (billions): what model_shape uses for a path that is not on this machine.
    sizes = {name: round(s.params / 1e9, 1) for name, s in KNOWN_SHAPES.items()}
    assert sizes == {"qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8,
                     "qwen3-32b": 32.8}  # fmt: skip
    assert model_shape("/pvc/models/Qwen3-4B-Instruct-2507")[0] is KNOWN_SHAPES["qwen3-4b"]
    assert model_shape("/pvc/models/my-model")[0] is None


def test_bytes_follow_precision_and_sharding() -> None:
    cfg = _cfg(*QWEN8B)
    shape = KNOWN_SHAPES["qwen3-8b"]
    p = shape.params
    ddp, fsdp = estimate(cfg, shape, 6, True, "ddp"), estimate(cfg, shape, 6, True, "fsdp")
    # DDP at its optimizer step: float32 master weights (4 bytes), gradients and the all-reduce buckets (4 + 4),
    # AdamW's two moments and its foreach temporary (8 + 4): 24 bytes a parameter, before any activation.
    assert ddp.phase == "optimizer step" and ddp.total == 24 * p
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * p, 8 * p, 12 * p)
    assert fsdp.weights == pytest.approx(4 * p / 6) and fsdp.optimizer == pytest.approx(8 * p / 6)
    assert fsdp.total < ddp.total / 3
    lora = estimate(_cfg(*QWEN8B, "model.lora.enabled=true"), shape, 6, True, "ddp")
    assert lora.weights == pytest.approx(2 * p, rel=0.02)  # a bf16 base; the float32 adapter is ~1% of it
    offload = estimate(_cfg(*QWEN8B, "parallel.cpu_offload=true"), shape, 6, True, "fsdp")
    assert offload.weights == offload.optimizer == 0 and offload.host == pytest.approx(16 * p / 6)
    checkpointed = estimate(_cfg(*QWEN8B, "model.gradient_checkpointing=true"), shape, 6, True, "fsdp")
    assert checkpointed.activations < fsdp.activations / 4


def test_render_refuses_a_plan_that_cannot_fit_and_says_what_would() -> None:
    result = runner.invoke(app, ["render", CONFIG, *(x for s in QWEN8B for x in ("--set", s)),
                                 "--set", "parallel.strategy=ddp"])  # fmt: skip
    assert result.exit_code == 2, result.output
    error, hint = result.stderr.splitlines()[:2]
    assert error.startswith("Error: memory plan for Qwen3-8B: needs ~") and "with ddp on 6 GPU(s)" in error
    assert "of 80 GB (cluster.gpu_memory_gb" in error
    assert hint.startswith("Hint: change one of: ") and "parallel.check_memory: false" in hint
    fsdp = next(part for part in hint.split("; ") if "parallel.strategy: fsdp" in part)
    assert "too much" not in fsdp, hint  # FSDP alone fits this plan, and the hint says so with its figure

    fits = runner.invoke(app, ["render", CONFIG, *(x for s in QWEN8B for x in ("--set", s))])  # auto: FSDP
    assert fits.exit_code == 0, fits.output
    assert (
        "info: memory per GPU (Qwen3-8B, fsdp [auto: full fine-tuning on 6 GPUs], 6 GPU(s) of 80 GB)"
        in fits.stderr
    )
    anyway = runner.invoke(app, ["render", CONFIG, *(x for s in QWEN8B for x in ("--set", s)),
                                 "--set", "parallel.strategy=ddp", "--set", "parallel.check_memory=false"])  # fmt: skip
    assert anyway.exit_code == 0 and "warning: memory: needs ~" in anyway.stderr


def test_validate_prints_the_plan_of_a_local_model(tiny_model: Path) -> None:
    result = runner.invoke(app, ["validate", CONFIG, "--set", f"model.path={tiny_model}", "--output", "json"])
    assert result.exit_code == 0, result.output
    plan, unknown = json.loads(result.stdout)["memory"]
    assert plan.startswith(
        f"memory per GPU ({tiny_model.name}, ddp [auto: one process, nothing to shard], 1 GPU(s))"
    )
    assert unknown.startswith(
        "memory: the GPUs' size is unknown, so the fit is not checked: set cluster.gpu_memory_gb"
    )


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ({"gpu_memory_gb": 40}, 40.0),
        ({"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, 80.0),
        ({"node_selector": {"nvidia.com/gpu.product": "NVIDIA-L40S"}}, 48.0),
        ({"node_selector": {"nvidia.com/gpu.product": "NVIDIA-L4"}}, 24.0),
        ({"node_selector": {"nvidia.com/gpu.memory": "81559"}}, 81559 / 1024),
        ({}, None),
    ],
)
def test_gpu_memory_comes_from_the_config_or_the_node_selector(cluster: dict, expected: float | None) -> None:
    cfg = _cfg(*(f"cluster.{k}={json.dumps(v)}" for k, v in cluster.items()))
    assert gpu_memory_gb(cfg)[0] == expected


@pytest.mark.parametrize(
    ("settings", "lora", "world", "gpu", "fits", "expected"),
    [
        ({}, False, 8, True, None, ("fsdp", "auto: full fine-tuning on 8 GPUs")),
        ({}, False, 1, True, None, ("ddp", "auto: one process, nothing to shard")),
        ({}, True, 8, True, True, ("ddp", "auto: LoRA (the trained adapter is small; replicas cost only the frozen base)")),
        ({}, True, 8, True, False, ("fsdp", "auto: LoRA, but a replicated base model does not fit the GPU (8 GPUs)")),
        ({}, False, 2, False, None, ("ddp", "auto: 2 CPU processes (set parallel.strategy: fsdp to shard)")),
        ({"cpu_offload": True}, True, 1, True, True, ("fsdp", "auto: parallel.cpu_offload needs FSDP's shards")),
        ({"strategy": "ddp"}, False, 8, True, None, ("ddp", "parallel.strategy: ddp")),
    ],
)  # fmt: skip
def test_auto_strategy(
    settings: dict, lora: bool, world: int, gpu: bool, fits: bool | None, expected
) -> None:
    assert resolve_strategy(ParallelConfig(**settings), lora, world, gpu, fits) == expected


def test_fsdp_only_settings_are_refused_under_ddp() -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.cpu_offload offloads FSDP's shards"):
        _cfg("parallel.strategy=ddp", "parallel.cpu_offload=true")


def test_estimate_is_close_above_the_measured_cpu_peak(tmp_path: Path) -> None:
    """One process, full weights and LoRA: the estimate within [1.0, 1.3] of the measured peak of live tensors
    (all seven cases of the benchmark, two-process ones included, are in docs/benchmarks.md)."""
    from benchmarks.memory_model import CASES, SHAPES, build_model, measure
    from benchmarks.memory_model import estimate as case_estimate

    s = dict(SHAPES["cpu"], layers=2, prompt=64, response=32)
    build_model(tmp_path / "m", s)
    for case in CASES[:3]:
        measured = measure(case, tmp_path / "m", s, "cpu")["peak"]
        est = case_estimate(case, tmp_path / "m", s, "cpu").total
        assert 1.0 <= est / measured <= 1.3, (case.name, est / GIB, measured / GIB)
