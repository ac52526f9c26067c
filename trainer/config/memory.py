"""Per-GPU memory of a training plan: weights, gradients, optimizer state and activations, by parallelism.

``estimate(cfg, shape, world, on_gpu, strategy)`` counts bytes per process from the model's shapes (its
``config.json``, or a known Qwen3 shape when ``model.path`` is not on this machine) and the config: precision
(``trainer.model.resolve_dtype``'s rules: float32 master weights for full fine-tuning, a bfloat16 base under
LoRA on a GPU), DDP or FSDP (``trainer.parallel``), CPU offload, LoRA, gradient checkpointing, and the tokens
of one micro-batch. ``check(cfg)`` is what ``launcher validate``/``render``/``submit`` call: it prints the
plan and refuses one that cannot fit ``cluster.gpu_memory_gb``, naming what would (each alternative
estimated). Imports nothing heavy: the launcher must start without torch.

What is counted (bytes; P parameters, Pt trained, L layers, N processes under FSDP, 1 under DDP):

- weights: P x the weights' dtype / N (LoRA: the frozen base in its dtype, the adapter in float32); the
  reference model (KL with full fine-tuning) and PPO's critic the same way;
- compute copies: DDP under bf16 autocast keeps a bf16 copy of every weight it multiplies for the backward
  pass (2 P); FSDP holds the root's parameters (embeddings, LM head, final norm: FSDP2 keeps the root
  unsharded from forward to backward) and two decoder layers (the one computing, the one prefetched) gathered
  in the compute dtype;
- gradients: Pt in the weights' dtype / N; DDP with several processes adds its all-reduce buckets (another
  Pt: accelerate's default ``gradient_as_bucket_view=False``); FSDP adds the unsharded gradients of the root
  and of one layer plus that layer's float32 reduce-scatter buffer;
- optimizer: AdamW's two moments, 2 Pt in the weights' dtype / N (plus one Pt temporary during its foreach
  step, a separate phase);
- activations of one micro-batch (``ceil(sequences per process / grad_accum)`` x the longest sequence),
  counted from what HF's Qwen3 decoder layer saves for the backward pass, per token and layer, with ``a`` the
  compute dtype's bytes: (8+4a)·hidden (two RMSNorms: each keeps a float32 copy of its input and its output)
  + (4+5a)·q_dim (q-norm, q after RoPE, k and v repeated to the query heads, attention output) + (4+a)·kv_dim
  (k-norm) + 4a·intermediate (SwiGLU); gradients appear as the activations are freed, so with one micro-batch
  the backward peak holds the larger of the two (both from the second micro-batch on);
  with gradient checkpointing a·hidden per layer plus one layer's full set; plus the LM head's selected
  logits and their gradient (trained positions x vocabulary x a, ``trainer.logprobs``) and its float32 chunks;
- generation (in-process ``hf`` engine, RL): under FSDP the full weights are gathered in the compute dtype for
  the rollout (``trainer.parallel.full_weights``), plus the KV cache of one generate batch.

The peak is the largest of three phases: backward (everything above but generation), the optimizer step and
generation. Not counted: the CUDA context, NCCL buffers and allocator fragmentation (``check`` keeps
``HEADROOM`` of the GPU free for them), and activations of a model family other than Qwen3/Llama-like
decoders. Measured against this on the CPU (and on a GPU when one is lent): docs/benchmarks.md, *Memory model*.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config.parallel import Strategy, resolve_strategy
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config.schema import RunConfig

GIB = 2**30
HEADROOM = 0.08  # share of a GPU left for the CUDA context, NCCL buffers and allocator fragmentation
HF_GENERATE_BATCH = 256  # trainer.engines.hf.HFEngine's max_batch: sequences per generate call
LM_HEAD_CHUNK = 256 * 2**20  # trainer.logprobs._CHUNK_BYTES: float32 rows per chunk of the loss head


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a dense decoder-only transformer (Qwen3, Llama, Mistral style)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qk_norm: bool = True  # Qwen3's per-head RMSNorm on queries and keys
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate + norms

    @property
    def root_params(self) -> int:
        """Embeddings, LM head (when not tied) and the final norm: what FSDP's root module holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, r: int, targets: list[str] | str, critic: bool = False) -> int:
        """Parameters of a LoRA adapter of rank ``r`` on ``targets`` (``all-linear``: every linear but the head)."""
        h, q, kv, inter = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in names)
        head = h + 1 if critic else 0  # PPO's critic trains its value head in full
        return self.layers * per_layer + head


# config.json of the released dense Qwen3 models (the -Base, instruct and -2507 variants share them).
KNOWN_SHAPES = {
    "qwen3-0.6b": ModelShape(151936, 1024, 28, 3072, 16, 8, 128, True, name="Qwen3-0.6B"),
    "qwen3-1.7b": ModelShape(151936, 2048, 28, 6144, 16, 8, 128, True, name="Qwen3-1.7B"),
    "qwen3-4b": ModelShape(151936, 2560, 36, 9728, 32, 8, 128, True, name="Qwen3-4B"),
    "qwen3-8b": ModelShape(151936, 4096, 36, 12288, 32, 8, 128, False, name="Qwen3-8B"),
    "qwen3-14b": ModelShape(151936, 5120, 40, 17408, 40, 8, 128, False, name="Qwen3-14B"),
    "qwen3-32b": ModelShape(151936, 5120, 64, 25600, 64, 8, 128, False, name="Qwen3-32B"),
}
_KNOWN_NAME = re.compile(r"qwen3-(0\.6|1\.7|4|8|14|32)b(?![0-9])", re.IGNORECASE)


def shape_from_config(config: dict, name: str = "") -> ModelShape:
    """A ``ModelShape`` from a Hugging Face ``config.json``; ValueError for what the model cannot describe."""
    if config.get("num_experts") or config.get("num_local_experts"):
        raise ValueError("a mixture-of-experts model (this estimate covers dense decoders)")
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return ModelShape(
            vocab=int(text["vocab_size"]), hidden=hidden, layers=int(text["num_hidden_layers"]),
            intermediate=int(text["intermediate_size"]), heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            # transformers' default; Llama-style configs that untie say so
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
            qk_norm=str(text.get("model_type", "")).startswith("qwen3"), name=name,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json lacks a dense decoder's shape ({e})") from None


def model_shape(path: str) -> tuple[ModelShape | None, str]:
    """The shape of the model at ``path``: its ``config.json`` when the directory is here, else a known Qwen3
    shape its name matches (a path inside the pod, a hub id); ``(None, why)`` when neither."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
            return shape_from_config(raw, name=Path(path).name), str(config)
        except (OSError, ValueError) as e:
            return None, f"{config}: {e}"
    m = _KNOWN_NAME.search(path)
    if m:
        shape = KNOWN_SHAPES[f"qwen3-{m.group(1).lower()}b"]
        return shape, f"{shape.name}'s published shape (model.path is not a directory here)"
    return None, (f"model.path {path!r} is not a directory here and names no known model (Qwen3-0.6B ... 32B), "
                  "so its shapes are unknown")  # fmt: skip


# GPU memory by the GPU-feature-discovery product label (nvidia.com/gpu.product) when it names no size.
_GPU_GB = {"H200": 141, "H100": 80, "H800": 80, "GH200": 96, "B200": 180, "A100": 40, "A800": 80,
           "L40S": 48, "L40": 48, "L4": 24, "A10G": 24, "A10": 24, "A6000": 48, "T4": 16, "V100": 16}  # fmt: skip


def gpu_memory_gb(cfg: RunConfig) -> tuple[float | None, str]:
    """Memory of each trainer GPU in GB and where it came from: ``cluster.gpu_memory_gb``, else the node
    selector's ``nvidia.com/gpu.memory`` (MiB, as GPU feature discovery labels nodes) or ``nvidia.com/gpu.product``."""
    c = cfg.cluster
    explicit = getattr(c, "gpu_memory_gb", None)
    if explicit:
        return float(explicit), "cluster.gpu_memory_gb"
    mib = c.node_selector.get("nvidia.com/gpu.memory")
    if mib and str(mib).isdigit():
        return int(mib) / 1024, f"node_selector nvidia.com/gpu.memory: {mib}"
    product = c.node_selector.get("nvidia.com/gpu.product", "")
    m = re.search(r"(\d+)\s*GB", product, re.IGNORECASE)
    if m:
        return float(m.group(1)), f"node_selector nvidia.com/gpu.product: {product}"
    for name in sorted(_GPU_GB, key=len, reverse=True):  # L40S before L40 before L4
        if re.search(rf"(^|[-_ ]){name}($|[-_ ])", product, re.IGNORECASE):
            return float(_GPU_GB[name]), f"node_selector nvidia.com/gpu.product: {product}"
    return None, "unknown (set cluster.gpu_memory_gb)"


@dataclass
class Estimate:
    """Bytes per process at the peak phase, by kind; ``host`` is what CPU offload moves to host memory."""

    weights: float = 0.0
    compute_copies: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    generation: float = 0.0  # gathered weights and KV cache of the in-process engine's rollout
    phase: str = "backward"
    host: float = 0.0
    strategy: str = "ddp"
    micro_batch: tuple[int, int] = (0, 0)  # sequences x tokens of the micro-batch the activations are for
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        parts = (
            self.weights,
            self.compute_copies,
            self.grads,
            self.optimizer,
            self.activations,
            self.generation,
        )
        return sum(parts)

    def describe(self) -> str:
        parts = [("weights", self.weights), ("compute copies", self.compute_copies), ("grads", self.grads),
                 ("optimizer", self.optimizer), ("activations", self.activations),
                 ("generation", self.generation)]  # fmt: skip
        shown = ", ".join(
            f"{name} {size(v)}" for name, v in parts if v >= 0.01 * self.total or name == "weights"
        )
        seqs, tokens = self.micro_batch
        batch = f"; micro-batch {seqs} x {tokens} tokens" if seqs else ""
        host = f"; {size(self.host)} on the host" if self.host else ""
        return f"{size(self.total)} ({shown}{batch}; peak in {self.phase}{host})"


def size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def estimate(cfg: RunConfig, shape: ModelShape, world: int, on_gpu: bool, strategy: Strategy) -> Estimate:
    """Bytes per process of ``cfg`` trained by ``world`` processes with ``strategy`` (see the module docstring)."""
    m, algo, par = cfg.model, cfg.algorithm, cfg.parallel
    lora = m.lora.enabled
    fsdp = strategy == "fsdp"
    n = world if fsdp else 1
    offload = fsdp and par.cpu_offload
    # trainer.model.resolve_dtype: float32 master weights for full fine-tuning; a bf16 base under LoRA on a GPU.
    wb = _dtype_bytes(m.dtype) if m.dtype != "auto" else (4 if not lora or not on_gpu else 2)
    autocast = on_gpu and m.dtype == "auto" and not lora and not fsdp  # trainer.model.autocast_bf16
    bf16_fsdp = fsdp and (
        par.mixed_precision == "bf16" or (par.mixed_precision == "auto" and on_gpu and m.dtype == "auto")
    )
    cb = 2 if autocast or bf16_fsdp else wb  # compute dtype (activations, gathered weights)
    rl = algo.name != "sft"
    critic = algo.name == "ppo"
    kl_ref = rl and algo.kl_coef > 0 and not lora

    p = shape.params
    pt = shape.lora_params(m.lora.r, m.lora.target_modules) if lora else p
    # PPO's critic: the backbone without the LM head, plus a scalar head; LoRA-trained when the policy is.
    pc = p - (0 if shape.tied else shape.vocab * shape.hidden) + shape.hidden + 1
    pct = shape.lora_params(m.lora.r, m.lora.target_modules, critic=True) if lora else pc
    models = [(p, pt)] + ([(pc, pct)] if critic else [])
    adapter_b = 4  # peft keeps adapters in float32
    wt_b = adapter_b if lora else wb  # bytes of a trained weight (grads and AdamW moments share its dtype)

    e = Estimate(strategy=strategy)
    per_rank = math.ceil(algo.batch_size * (algo.group_size if rl else 1) / world)
    e.micro_batch = (math.ceil(per_rank / algo.grad_accum), _seq_len(cfg))
    trained = sum(t for _, t in models)
    weights = sum(total * wb + (t * adapter_b if lora else 0) for total, t in models) / n
    if kl_ref:
        weights += p * (_dtype_bytes(m.dtype) if m.dtype != "auto" else (2 if on_gpu else 4)) / n
    grads = trained * wt_b / n  # the .grad tensors (sharded under FSDP), filled in during backward
    root_grads = 0 if lora else shape.root_params * wt_b / n * len(models)  # the LM head's: first in backward
    buckets = trained * wt_b if not fsdp and world > 1 else 0.0  # DDP's all-reduce buckets: always allocated
    opt = trained * 2 * wt_b / n
    if offload:
        e.host = weights + grads + opt
        weights, grads, root_grads, opt = 0.0, 0.0, 0.0, 0.0
        e.notes.append(f"CPU offload: {e.host / GIB:.1f} GiB of shards per process in host memory")

    copies = transient = 0.0
    if autocast:
        copies = sum(total for total, _ in models) * 2
    elif fsdp:
        copies = (shape.root_params + 2 * shape.layer_params) * cb * len(models)
        if not lora:  # the unsharded gradients of the root and one layer, and that layer's reduce buffer
            transient = (shape.root_params * cb + shape.layer_params * (cb + 4)) * len(models)
    act_layers, act_head = (x * len(models) for x in _activations(cfg, shape, world, cb, autocast))

    # Backward: the activations are freed layer by layer as the layers' gradients appear. With one micro-batch
    # a step the peak is the larger of the two (at its start or its end); from the second micro-batch on, the
    # gradients of the earlier ones are all there while its activations are too.
    layer_grads = grads - root_grads
    if algo.grad_accum > 1:
        grads_at_peak, acts_at_peak = grads, act_layers + act_head
    elif act_layers >= layer_grads:
        grads_at_peak, acts_at_peak = root_grads, act_layers + act_head
    else:
        grads_at_peak, acts_at_peak = grads, act_head
    e.weights, e.optimizer, e.compute_copies = weights, opt, copies
    e.grads, e.activations = buckets + transient + grads_at_peak, acts_at_peak
    backward = e.total
    # The optimizer step: all gradients, and one trained-parameter-sized temporary of AdamW's foreach path.
    step_extra = 0.0 if offload else trained * wt_b / n
    step_phase = weights + opt + buckets + grads + step_extra
    gen_phase = 0.0
    if rl and cfg.rollout.engine == "hf":
        seqs = min(HF_GENERATE_BATCH, math.ceil(algo.batch_size * algo.group_size / world))
        kv = seqs * _seq_len(cfg) * shape.layers * 2 * shape.kv_dim * cb
        gen = kv + (p * cb if fsdp else 0)
        gen_phase = weights + opt + buckets + gen  # zero_grad(set_to_none=True): no gradients while sampling
    if gen_phase > max(backward, step_phase):
        e.phase, e.generation = "generation", gen
        e.grads, e.compute_copies, e.activations = buckets, 0.0, 0.0
    elif step_phase > backward:
        e.phase = "optimizer step"
        e.grads, e.optimizer, e.compute_copies, e.activations = buckets + grads, opt + step_extra, 0.0, 0.0
    return e


def _seq_len(cfg: RunConfig) -> int:
    """Longest sequence: the prompt plus every agent turn, and for multi-turn an observation of up to
    ``max_new_tokens`` after each turn (user simulators are not bounded by the config), at most
    ``environment.max_episode_tokens``."""
    env = cfg.environment
    if env.name == "single_turn":
        return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    longest = cfg.data.max_prompt_tokens + env.max_turns * 2 * cfg.rollout.max_new_tokens
    return min(longest, getattr(env, "max_episode_tokens", longest))


def _activations(
    cfg: RunConfig, shape: ModelShape, world: int, a: int, autocast: bool
) -> tuple[float, float]:
    """Bytes kept for the backward pass of one micro-batch: (decoder layers, final norm and LM head)."""
    algo = cfg.algorithm
    per_rank = math.ceil(algo.batch_size * (algo.group_size if algo.name != "sft" else 1) / world)
    seqs = math.ceil(per_rank / algo.grad_accum)
    seq_len = _seq_len(cfg)
    tokens = seqs * seq_len
    turns = 1 if cfg.environment.name == "single_turn" else cfg.environment.max_turns
    trained = seqs * min(seq_len, turns * cfg.rollout.max_new_tokens)
    h, q, kv, inter = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    # HF's Qwen3 layer, tensor by tensor (docs/benchmarks.md, *Memory model*): each RMSNorm keeps a float32 copy of
    # its input and its normalised output (4 + a per element, the attention's q/k norms too), the next linear its
    # input; SDPA keeps q, k and v after RoPE (k and v repeated to every query head when a padding mask rules out
    # its GQA kernel) and its output; SwiGLU four intermediate-sized tensors. RoPE keeps nothing of size (cos
    # and sin need no gradient); the attention output needs no copy before o_proj (SDPA writes it token-major).
    per_layer = (8 + 4 * a) * h + (4 + 5 * a) * q + (4 + a) * kv + 4 * a * inter
    if autocast:  # the residual stream stays float32 under autocast: the norms keep float32 outputs too
        per_layer += 4 * h
    lora = cfg.model.lora
    norm_out = a
    if lora.enabled:  # a frozen RMSNorm weight needs no gradient, so its normalised input is not kept for one
        per_layer -= a * (2 * h + q + kv)
        norm_out = 0
    if lora.enabled and lora.dropout > 0 and algo.name == "sft":  # RL turns dropout off (trainer.model)
        per_layer += (a + 1) * (5 * h + q + inter)  # each adapted input's dropped-out copy and its mask
    if cfg.model.gradient_checkpointing:
        layers = shape.layers * a * h + per_layer  # checkpointed inputs, one layer recomputed at a time
    else:
        layers = shape.layers * per_layer
    logits = trained * shape.vocab * a
    head = 2 * logits + min(3 * LM_HEAD_CHUNK, 3 * trained * shape.vocab * 4)
    return tokens * layers, tokens * (4 + norm_out) * h + head


@dataclass
class Plan:
    """A config's cluster plan: processes, GPUs, the chosen strategy and its estimate."""

    world: int
    on_gpu: bool
    shape: ModelShape | None
    source: str
    strategy: Strategy
    reason: str
    estimate: Estimate | None
    gpu_gb: float | None
    gpu_source: str

    @property
    def fits(self) -> bool | None:
        if self.estimate is None or self.gpu_gb is None or not self.on_gpu:
            return None
        return self.estimate.total <= usable_bytes(self.gpu_gb)

    def describe(self) -> str:
        where = (f"{self.world} GPU(s) of {self.gpu_gb:g} GB" if self.on_gpu and self.gpu_gb
                 else f"{self.world} GPU(s)" if self.on_gpu else f"{self.world} CPU process(es)")  # fmt: skip
        if self.estimate is None:
            return f"memory: not estimated: {self.source}"
        return (f"memory per {'GPU' if self.on_gpu else 'process'} ({self.shape.name or 'model'}, "
                f"{self.strategy} [{self.reason}], {where}): ~{self.estimate.describe()}")  # fmt: skip


def usable_bytes(gpu_gb: float) -> float:
    return gpu_gb * GIB * (1 - HEADROOM)


def cluster_plan(cfg: RunConfig) -> Plan:
    """The plan ``launcher submit`` would run: ``cluster.nodes`` x the trainer's GPUs (or one CPU process a pod)."""
    c = cfg.cluster
    on_gpu = c.trainer_gpus > 0
    world = c.nodes * (c.trainer_gpus if on_gpu else 1)
    return plan(cfg, world, on_gpu, gpu_memory_gb(cfg))


def plan(cfg: RunConfig, world: int, on_gpu: bool, gpu: tuple[float | None, str]) -> Plan:
    shape, source = model_shape(cfg.model.path)
    gpu_gb, gpu_source = gpu
    ddp_fits = None
    if shape is not None and gpu_gb is not None and on_gpu:
        ddp_fits = estimate(cfg, shape, world, on_gpu, "ddp").total <= usable_bytes(gpu_gb)
    strategy, reason = resolve_strategy(cfg.parallel, cfg.model.lora.enabled, world, on_gpu, ddp_fits)
    est = estimate(cfg, shape, world, on_gpu, strategy) if shape is not None else None
    return Plan(world, on_gpu, shape, source, strategy, reason, est, gpu_gb, gpu_source)


def _alternatives(cfg: RunConfig, p: Plan) -> list[str]:
    """What to change, each estimated: single changes, cheapest to the run's quality first, and when none is
    enough, the smallest micro-batch split that fits with FSDP and gradient checkpointing."""
    assert p.shape is not None and p.gpu_gb is not None
    limit = usable_bytes(p.gpu_gb)

    def variant(base: RunConfig, **sections) -> RunConfig:
        return base.model_copy(update={k: getattr(base, k).model_copy(update=v) for k, v in sections.items()})

    def total(alt: RunConfig, world: int) -> float | None:
        est = plan(alt, world, True, (p.gpu_gb, p.gpu_source)).estimate
        return None if est is None else est.total

    algo = cfg.algorithm
    per_rank = math.ceil(algo.batch_size * (algo.group_size if algo.name != "sft" else 1) / p.world)
    tries: list[tuple[str, RunConfig, int]] = []
    if p.strategy == "ddp":
        tries.append(("parallel.strategy: fsdp", variant(cfg, parallel={"strategy": "fsdp"}), p.world))
    if not cfg.model.gradient_checkpointing:
        tries.append(("model.gradient_checkpointing: true", variant(cfg, model={"gradient_checkpointing": True}),
                      p.world))  # fmt: skip
    if algo.grad_accum * 4 <= per_rank:
        tries.append((f"algorithm.grad_accum: {algo.grad_accum * 4} (a smaller micro-batch)",
                      variant(cfg, algorithm={"grad_accum": algo.grad_accum * 4}), p.world))  # fmt: skip
    if not cfg.model.lora.enabled:
        lora = cfg.model.lora.model_copy(update={"enabled": True})
        tries.append(("model.lora.enabled: true", variant(cfg, model={"lora": lora}), p.world))
    if p.strategy == "fsdp" and not cfg.parallel.cpu_offload:
        tries.append(("parallel.cpu_offload: true", variant(cfg, parallel={"cpu_offload": True}), p.world))
    if p.strategy == "fsdp" or cfg.parallel.strategy != "ddp":
        tries.append((f"more GPUs (cluster.nodes: {cfg.cluster.nodes * 2})", cfg, p.world * 2))
    out, fits = [], False
    for label, alt, world in tries:
        t = total(alt, world)
        if t is not None:
            fits |= t <= limit
            out.append(f"{label}: ~{t / GIB:.1f} GiB{'' if t <= limit else ' (still too much)'}")
    if not fits:
        combo = variant(cfg, model={"gradient_checkpointing": True}, parallel={"strategy": "fsdp"})
        accum = algo.grad_accum
        while accum <= per_rank:
            t = total(variant(combo, algorithm={"grad_accum": accum}), p.world)
            if t is not None and t <= limit:
                changes = [c for c, needed in (("parallel.strategy: fsdp", p.strategy == "ddp"),
                           ("model.gradient_checkpointing: true", not cfg.model.gradient_checkpointing),
                           (f"algorithm.grad_accum: {accum}", accum != algo.grad_accum)) if needed]  # fmt: skip
                out.insert(0, f"{' + '.join(changes)} together: ~{t / GIB:.1f} GiB")
                break
            accum *= 2
    return out


def check(cfg: RunConfig) -> list[str]:
    """The plan's lines for the user; raises ``UserError`` when it cannot fit the cluster's GPUs (unless
    ``parallel.check_memory`` is false). Never loads a model: shapes come from ``config.json`` or names."""
    if cfg.model.create_if_missing and not (Path(cfg.model.path) / "config.json").is_file():
        return [f"memory: not estimated: model.create_if_missing builds {cfg.model.path} when the run starts"]
    p = cluster_plan(cfg)
    lines = [p.describe()]
    if p.estimate is not None:
        lines += p.estimate.notes
    if p.on_gpu and p.estimate is not None and p.gpu_gb is None:
        lines.append("memory: the GPUs' size is unknown, so the fit is not checked: set cluster.gpu_memory_gb "
                     "(or a node_selector on nvidia.com/gpu.product)")  # fmt: skip
    if p.fits is False:
        assert p.estimate is not None and p.gpu_gb is not None
        problem = (f"needs ~{p.estimate.total / GIB:.1f} GiB per GPU with {p.strategy} on {p.world} GPU(s), more "
                   f"than the {usable_bytes(p.gpu_gb) / GIB:.1f} GiB usable of {p.gpu_gb:g} GB ({p.gpu_source}; "
                   f"{HEADROOM:.0%} kept for CUDA): {p.estimate.describe()}")  # fmt: skip
        if cfg.parallel.check_memory:
            alternatives = _alternatives(cfg, p)
            raise UserError(f"memory plan for {p.shape.name or cfg.model.path}", problem,
                            hint="change one of: " + "; ".join(alternatives) + " (or parallel.check_memory: false "
                            "to submit anyway)")  # fmt: skip
        lines.append(f"warning: memory: {problem} (parallel.check_memory is false: not refused)")
    return lines


__all__ = ["Estimate", "ModelShape", "Plan", "check", "cluster_plan", "estimate", "gpu_memory_gb", "model_shape",
           "plan"]  # fmt: skip
