"""FSDP2 for the policy, the critic and the reference model, and what DDP and FSDP do differently in a step.

``Session`` decides the strategy once (``choose``: ``parallel.strategy``, resolved by
``trainer.config.parallel.resolve_strategy``) and calls into here at the few points where the two differ:

- ``shard(model, plan)``: ``fully_shard`` on every decoder layer (the classes HF lists in
  ``_no_split_modules``), then on the root, which keeps the embeddings, the LM head and the final norm (the
  root is the Hugging Face model, inside a PEFT wrapper too, so that every forward enters through it). One
  ``MixedPrecisionPolicy`` for all: bf16 compute with float32 master weights and float32 gradient reduction
  (``reduce_dtype``), or the weights' own dtype; ``CPUOffloadPolicy`` with ``parallel.cpu_offload``. The model
  is loaded on the CPU first and moved to the device layer by layer as it is sharded, so no process ever holds
  the whole model on its GPU. LoRA works unchanged: FSDP2 shards per parameter (DTensor), so frozen and
  trained parameters share a layer's group. ``trainer.logprobs``' LM-head pre-hook sees the root's gathered
  head like any module.
- gradients: FSDP2 reduce-scatters after every micro-batch's backward (no ``no_sync``): the sharded gradients
  accumulate, and an unsharded gradient never outlives its layer's backward. It averages over ranks as DDP
  does, so ``Session.loss_denominator`` holds for both.
- ``clip_grad_norm``: the norm over DTensor gradients is itself a DTensor; ``full_tensor`` makes it the
  global one (the same number DDP's replicas compute).
- ``full_weights`` (the in-process ``hf`` engine): every layer is gathered once and kept for the rollout
  (``set_reshard_after_forward(False)``), then resharded. Generation then runs no collectives, so ranks may
  call ``generate`` a different number of times with different lengths (multi-turn episodes, early EOS).
- ``save_pretrained(model, path)``: the full weights as a plain Hugging Face directory, gathered one tensor
  at a time (an all-gather each, every rank in the same order) and written by the ranks given a ``path`` in
  safetensors files of at most ``SHARD_BYTES``: GPU memory holds one full tensor, host memory one file's
  worth, whatever the model's size. The rollout hand-over and checkpoint export both use it.

Why not accelerate's FSDP2 plugin: it wraps through ``prepare`` with its own auto-wrap policy, mixed-precision
and state-dict settings spread over a plugin object and environment variables; calling ``fully_shard``
directly keeps the few lines that matter (what is sharded, in which dtype, how state is gathered) readable
here, and accelerate stays what it is for DDP: process setup, ``prepare``, reductions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import memory
from trainer.config.parallel import Strategy, resolve_strategy
from trainer.config.schema import RunConfig
from trainer.errors import UserError
from trainer.model import unwrap

SHARD_BYTES = 2 * 2**30  # safetensors file size of streamed exports (Hugging Face writes ~5 GB shards)


@dataclass(frozen=True)
class ParallelPlan:
    strategy: Strategy
    reason: str
    param_dtype: torch.dtype | None = None  # FSDP compute dtype; None: the weights' own
    cpu_offload: bool = False

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def describe(self, world: int) -> str:
        if not self.fsdp:
            return f"parallel: ddp ({self.reason})"
        mp = f"{str(self.param_dtype).removeprefix('torch.')} compute, float32 reduce" if self.param_dtype else (
            "weights' own dtype")  # fmt: skip
        offload = ", CPU offload of weights, gradients and AdamW state" if self.cpu_offload else ""
        return f"parallel: fsdp over {world} process(es) ({self.reason}; {mp}{offload})"


def choose(cfg: RunConfig, world: int, device: torch.device) -> ParallelPlan:
    """The run's strategy and, for FSDP, its mixed precision (``parallel.mixed_precision``)."""
    par = cfg.parallel
    ddp_fits = None
    if par.strategy == "auto" and cfg.model.lora.enabled and device.type == "cuda":
        est = estimate_bytes(cfg, world, device, "ddp")
        ddp_fits = None if est is None else est <= memory.usable_bytes(gpu_bytes(device) / memory.GIB)
    strategy, reason = resolve_strategy(par, cfg.model.lora.enabled, world, device.type == "cuda", ddp_fits)
    if strategy == "ddp":
        return ParallelPlan("ddp", reason)
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if par.mixed_precision == "bf16" and not bf16_ok:
        raise UserError("parallel.mixed_precision: bf16", f"{torch.cuda.get_device_name(device)} has no bfloat16",
                        hint="set parallel.mixed_precision: none (or auto)")  # fmt: skip
    if par.mixed_precision == "bf16" or (par.mixed_precision == "auto" and device.type == "cuda" and bf16_ok
                                         and cfg.model.dtype == "auto"):  # fmt: skip
        dtype = torch.bfloat16
    else:
        dtype = None
    return ParallelPlan("fsdp", reason, dtype, par.cpu_offload)


def gpu_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def estimate_bytes(cfg: RunConfig, world: int, device: torch.device, strategy: Strategy) -> float | None:
    """``trainer.config.memory``'s estimate for this run (None when ``model.path`` has no readable shape)."""
    shape, _ = memory.model_shape(cfg.model.path)
    if shape is None:
        return None
    return memory.estimate(cfg, shape, world, device.type == "cuda", strategy).total


def memory_line(cfg: RunConfig, world: int, device: torch.device, strategy: Strategy) -> str:
    """The start-up line with the memory estimate of this process (checked against measured peaks in
    docs/benchmarks.md, *Memory model*)."""
    shape, source = memory.model_shape(cfg.model.path)
    if shape is None:
        return f"memory estimate: none ({source})"
    est = memory.estimate(cfg, shape, world, device.type == "cuda", strategy)
    where = f" of {gpu_bytes(device) / memory.GIB:.0f} GiB" if device.type == "cuda" else ""
    return f"memory estimate per process{where}: ~{est.describe()}"


def peak_memory_line(cfg: RunConfig, world: int, device: torch.device, strategy: Strategy) -> str | None:
    """At the end of a GPU run: the measured peak beside the estimate (what docs/benchmarks.md compares)."""
    if device.type != "cuda":
        return None
    est = estimate_bytes(cfg, world, device, strategy)
    versus = f"; estimate {memory.size(est)}" if est is not None else ""
    peak = memory.size(torch.cuda.max_memory_allocated(device))
    return f"peak GPU memory {peak} (allocated tensors{versus})"


def init_single_process_group(device: torch.device) -> bool:
    """FSDP needs a process group; a plain ``python -m trainer`` (one process, no torchrun) has none. True when
    this call created it (the caller destroys it at the end, so a notebook's next run starts clean)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those whose class HF marks as not to be split (decoder layers)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"{type(unwrap(model)).__name__} names no decoder layer class (_no_split_modules): "
                           "FSDP would gather the whole model at once; use parallel.strategy: ddp")  # fmt: skip
    return layers


def root_module(model: torch.nn.Module) -> torch.nn.Module:
    """The FSDP root: the Hugging Face model itself, inside a PEFT wrapper. Every forward and ``generate`` (which
    PEFT forwards to it) then enters through the root, as FSDP2 requires of the first forward."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard(model: torch.nn.Module, plan: ParallelPlan, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` per decoder layer, then the root; returns ``model`` (the sharded modules' classes swap)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype,
                              reduce_dtype=torch.float32 if plan.param_dtype is not None else None)  # fmt: skip
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if plan.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    root = root_module(model)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload)  # and the buffers
    root.userloop_compute_dtype = plan.param_dtype  # what the rollout hand-over writes (compute_dtype)
    return model


def compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a sharded ``model`` computes in (its mixed-precision policy), None for the weights' own."""
    return getattr(root_module(unwrap(model)), "userloop_compute_dtype", None)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(root_module(unwrap(model)), FSDPModule)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip to ``max_norm`` (None: only measure) and return the global gradient norm, for DDP and FSDP alike."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


@contextlib.contextmanager
def full_weights(model: torch.nn.Module | None) -> Iterator[None]:
    """Keep every layer of a sharded ``model`` gathered inside the block (a collective on entry and exit:
    every rank enters together); nothing for an unsharded one."""
    if model is None or not is_sharded(model):
        yield
        return
    gather(model)
    try:
        yield
    finally:
        release(model)


def gather(model: torch.nn.Module) -> None:
    """All-gather every layer and keep it (sampling with no collectives), until ``release``. The root keeps its
    own FSDP2 default (no reshard after forward); the layers' is switched off here and back on in ``release``."""
    root, modules = root_module(model), fsdp_modules(model)
    for m in modules:
        if m is not root:
            m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()


def release(model: torch.nn.Module) -> None:
    root = root_module(model)
    for m in fsdp_modules(model):
        m.reshard()
        if m is not root:
            m.set_reshard_after_forward(True, recurse=False)


# ----------------------------------------------------------------------------- full weights, streamed


def _unique_tensors(model: torch.nn.Module, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``state_dict`` names and tensors (DTensors when sharded), the same order on every rank; a tied weight
    (Qwen3's embeddings and LM head) once, under its first name, as ``save_pretrained`` writes it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    seen: set[int] = set()
    for name in model.state_dict():
        t = params.get(name)
        if t is None:
            t = buffers.get(name)
        if t is None or id(t) in seen or (trainable_only and not t.requires_grad):
            continue
        seen.add(id(t))
        yield name, t


def gather_tensors(model: torch.nn.Module, writes: bool, dtype: torch.dtype | None = None,
                   trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:  # fmt: skip
    """Each full tensor, one at a time, on the CPU where ``writes`` (None elsewhere): a collective per tensor
    under FSDP, so every rank must iterate to the end."""
    from torch.distributed.tensor import DTensor

    for name, t in _unique_tensors(model, trainable_only):
        t = t.detach()
        if isinstance(t, DTensor):
            if t.device.type != t.device_mesh.device_type:  # CPU-offloaded shards: gather on the device
                t = t.to(t.device_mesh.device_type)
            t = t.full_tensor()
        yield name, (t.to(dtype or t.dtype).cpu() if writes else None)


class _ShardWriter:
    """safetensors files of at most ``limit`` bytes and their index, as ``save_pretrained`` lays them out."""

    def __init__(self, path: Path, limit: int = SHARD_BYTES):
        self.path, self.limit = path, limit
        self.files: list[tuple[str, list[str]]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.path / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.path / self.files[0][0], self.path / "model.safetensors")
            return
        n, weight_map = len(self.files), {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / tmp, self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def save_pretrained(model: torch.nn.Module, path: Path | None, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` where ``path`` is given as ``save_pretrained`` would (a full model: config, generation
    config, safetensors; a PEFT model: its adapter). A collective when ``model`` is sharded: every rank calls
    it, those without a ``path`` only take part in the gathers. ``dtype`` casts full weights (the rollout
    hand-over in the compute dtype); adapters keep theirs."""
    model = unwrap(model)
    if not is_sharded(model):
        if path is not None:
            model.save_pretrained(path, safe_serialization=True)
        return
    peft = hasattr(model, "peft_config")
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    if peft:  # the adapter (and modules_to_save) only: small, gathered whole
        sd = {name: t for name, t in gather_tensors(model, path is not None, trainable_only=True)}
        if path is not None:
            model.save_pretrained(path, state_dict=sd, safe_serialization=True)
        return
    writer = _ShardWriter(path) if path is not None else None
    exported, error = None, None
    for name, t in gather_tensors(model, writer is not None, dtype):
        if writer is not None and t is not None and error is None:
            try:
                writer.add(name, t)
            except (OSError, RuntimeError) as e:
                error = e  # keep gathering: the other ranks wait in the next all-gather
            exported = t.dtype
    if writer is None:
        return
    if error is not None:
        raise error
    writer.close()
    config = copy.deepcopy(model.config)
    if exported is not None:
        config.dtype = exported  # what the files hold, as save_pretrained records it
    config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(path)
