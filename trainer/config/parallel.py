"""The ``parallel`` section: how the trainer's processes share the model (DDP replicas or FSDP2 shards).

``resolve_strategy`` turns ``parallel.strategy: auto`` into ``ddp`` or ``fsdp`` with the reason, from what
only the running job knows (process count, GPU or CPU) and, for LoRA, whether the memory estimate says a
replicated base fits the GPU (``trainer.config.memory``). The trainer prints the choice at start; the
launcher resolves it the same way for the cluster plan (``launcher validate``/``render``). Imports only
pydantic, like the rest of ``trainer.config``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainer.config.base import Section

Strategy = Literal["ddp", "fsdp"]


class ParallelConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How the trainer's processes share the model. `ddp`: every process holds all weights, "
        "gradients and AdamW state (full fine-tuning: up to 24 bytes a parameter with its all-reduce buckets) and "
        "gradients are all-reduced. "
        "`fsdp`: PyTorch FSDP2 (`fully_shard` per decoder layer, for the policy, the critic and the reference "
        "model): each process holds 1/N of them and gathers one layer at a time; checkpoints are sharded "
        "(`torch.distributed.checkpoint`). `auto`: `fsdp` for full fine-tuning with more than one process on "
        "GPUs, for LoRA when the memory estimate says a replicated base does not fit the GPU, and whenever "
        "`cpu_offload` is on; `ddp` otherwise (CPU runs included). The choice and its reason are printed at start.",
    )
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto",
        description="FSDP: the dtype the gathered weights compute in. `bf16`: bfloat16 forward and backward, "
        "float32 master weights, optimizer and gradient reduction (FSDP2's `MixedPrecisionPolicy`). `none`: the "
        "weights' own dtype. `auto`: `bf16` on a GPU that supports it with `model.dtype: auto`, else `none` (the "
        "CPU computes in float32, as DDP does there). DDP keeps its own bf16 autocast on GPUs.",
    )
    cpu_offload: bool = Field(
        False,
        description="FSDP: keep the sharded weights, gradients and AdamW state in host memory and step AdamW on "
        "the CPU (FSDP2's `CPUOffloadPolicy`): the GPU then holds only the gathered layers and the activations, at "
        "the cost of host-device copies and a CPU optimizer step. Needs host RAM for ~16 bytes a trained "
        "parameter, split over all processes. Implies `strategy: fsdp` under `auto`.",
    )
    check_memory: bool = Field(
        True,
        description="`launcher validate`/`render`/`submit` refuse a plan whose estimated per-GPU memory (README, "
        "*Memory*) exceeds what `cluster.gpu_memory_gb` leaves after CUDA's own overhead. Set false to submit a "
        "plan the estimate rejects (the estimate is printed either way).",
    )

    @model_validator(mode="after")
    def _fsdp_only_settings(self) -> ParallelConfig:
        if self.strategy == "ddp" and self.cpu_offload:
            raise ValueError(
                "parallel.cpu_offload offloads FSDP's shards, but parallel.strategy is ddp: set strategy: fsdp "
                "(or auto), or remove cpu_offload"
            )
        if self.strategy == "ddp" and self.mixed_precision == "bf16":
            raise ValueError(
                "parallel.mixed_precision applies to FSDP, but parallel.strategy is ddp (which uses bf16 autocast "
                "on GPUs by itself): set strategy: fsdp, or remove mixed_precision"
            )
        return self


def resolve_strategy(cfg: ParallelConfig, lora: bool, world: int, on_gpu: bool,
                     ddp_fits: bool | None = None) -> tuple[Strategy, str]:  # fmt: skip
    """``(strategy, reason)`` for ``world`` processes; ``ddp_fits``: the memory estimate's verdict on a
    replicated plan for this GPU (None: unknown), consulted for LoRA only."""
    if cfg.strategy != "auto":
        return cfg.strategy, f"parallel.strategy: {cfg.strategy}"
    if cfg.cpu_offload:
        return "fsdp", "auto: parallel.cpu_offload needs FSDP's shards"
    if world == 1:
        return "ddp", "auto: one process, nothing to shard"
    if not on_gpu:
        # Gloo on CPUs: the tested default; FSDP on the CPU works (parallel.strategy: fsdp) but saves nothing there.
        return "ddp", f"auto: {world} CPU processes (set parallel.strategy: fsdp to shard)"
    if not lora:
        return "fsdp", f"auto: full fine-tuning on {world} GPUs"
    if ddp_fits is False:
        return "fsdp", f"auto: LoRA, but a replicated base model does not fit the GPU ({world} GPUs)"
    return "ddp", "auto: LoRA (the trained adapter is small; replicas cost only the frozen base)"
