"""Load the policy (full weights or a LoRA adapter through peft), its tokenizer and the KL reference.

Models load with ``from_pretrained(path)``, the same call for a real Qwen3 checkpoint and for the tiny
model the tests build. ``checkpoint`` points at a saved ``policy/`` to continue from: a full model is
loaded from there; an adapter is loaded onto the base from ``model.path``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainer.config.schema import ModelConfig
from trainer.errors import UserError


def quiet_libraries() -> None:
    """No progress bars or info chatter in logs meant for ``kubectl logs``."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def resolve_dtype(name: str, device: torch.device, trains_all_weights: bool = False) -> torch.dtype:
    """``auto``: bfloat16 on a capable GPU, except for weights the optimizer updates directly.

    Full fine-tuning keeps float32 master weights (the forward runs under bf16 autocast, see
    ``Session``): a bf16 weight cannot absorb a 1e-6-sized update (0.02 - 1e-6 == 0.02 in bf16).
    LoRA adapters are kept in float32 by peft, so the frozen base can be bf16.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported() and not trains_all_weights:
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def autocast_bf16(cfg: ModelConfig) -> bool:
    """Whether training forwards run under bf16 autocast (full fine-tuning with ``dtype: auto`` on a GPU)."""
    return (
        cfg.dtype == "auto"
        and not cfg.lora.enabled
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """RL compares log-probs of the same tokens across forwards; dropout noise would show up as policy change."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def ensure_model(cfg: ModelConfig) -> None:
    """Build the tiny model at ``cfg.path`` when the config asks for it and it is missing."""
    if cfg.create_if_missing and not (Path(cfg.path) / "config.json").exists():
        from trainer.tiny import build_tiny_model

        build_tiny_model(cfg.path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: {path}", f"cannot load a tokenizer: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Generation batches are left-padded so every prompt ends where its completion starts.
    tok.padding_side = "left"
    return tok


def load_policy(cfg: ModelConfig, device: torch.device, checkpoint: Path | None = None,
                place: bool = True) -> PreTrainedModel:  # fmt: skip
    """The policy in ``device``'s dtype, moved there unless ``place`` is false (FSDP moves it layer by layer)."""
    dtype = resolve_dtype(cfg.dtype, device, trains_all_weights=not cfg.lora.enabled)
    source = checkpoint if checkpoint is not None and not cfg.lora.enabled else cfg.path
    model = from_pretrained(source, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            lora = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
    return model.to(device) if place else model


def load_reference(cfg: ModelConfig, device: torch.device, place: bool = True) -> PreTrainedModel | None:
    """A frozen copy of the starting weights for the KL term; None with LoRA (the base is the reference)."""
    if cfg.lora.enabled:
        return None
    ref = from_pretrained(cfg.path, resolve_dtype(cfg.dtype, device))
    ref = (ref.to(device) if place else ref).eval()
    ref.requires_grad_(False)
    return ref


def from_pretrained(path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """A causal LM from ``path``; a LoRA adapter directory (e.g. an SFT run's ``policy/``) is merged into its base.

    Without the merge, transformers would attach the adapter and a new LoRA (or the optimizer) would
    silently train on top of the base alone, discarding the SFT stage.
    """
    adapter = Path(path) / "adapter_config.json"
    prefetch = None
    try:
        if adapter.is_file():
            import json

            from peft import PeftModel

            base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
            prefetch = Prefetch(Path(base_path))  # the adapter itself is small
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
            return PeftModel.from_pretrained(base, path).merge_and_unload()
        prefetch = Prefetch(Path(path))  # reads the weights in while transformers builds the model
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model.path: {path}", f"cannot load a causal LM: {e}") from None
    finally:
        if prefetch is not None:
            prefetch.stop()  # loaded (or failed): what is left to read is of no use


class Prefetch:
    """Read a checkpoint's weight files into the page cache with a few threads, in the background.

    safetensors maps the files and transformers copies tensor after tensor, so a cold load reads by page
    fault, one small read at a time; threads reading large blocks sequentially keep the disk (or a network
    volume) busy meanwhile. Measured on this workplace's VM after dropping the page cache (0.6B bf16,
    docs/benchmarks.md, *Checkpoint I/O*): a cold load 0.84 -> 0.63 s and 1.25 -> 0.90 s in two runs (medians of
    5 rounds; single rounds spread widely). Only the files transformers will read (``model.safetensors``, or the shards of
    ``model.safetensors.index.json``); skipped when they would take more than half the memory available to
    this process (the cgroup's limit counts): pages read too early would evict each other. torchrun's ranks
    on one node split the spans between them and share the page cache.
    """

    THREADS = 4
    BLOCK = 16 << 20

    def __init__(self, directory: Path) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            files = weight_files(directory)
            size = sum(f.stat().st_size for f in files)
            spans = self.ranges(files)
        except (OSError, ValueError, KeyError):  # unreadable or dangling: transformers will say what is wrong
            return
        if not files or size > _available_memory() // 2:
            return
        local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        work = iter(spans[local::local_world])
        lock = threading.Lock()

        def read() -> None:
            buf = memoryview(bytearray(self.BLOCK))
            while not self._stop.is_set():
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                f, start, end = item
                with contextlib.suppress(OSError), open(f, "rb", buffering=0) as fh:
                    fh.seek(start)
                    while (start < end and not self._stop.is_set()
                           and (n := fh.readinto(buf[: min(self.BLOCK, end - start)]))):  # fmt: skip
                        start += n

        threads = max(1, self.THREADS // max(1, local_world))
        self._threads = [threading.Thread(target=read, name="prefetch", daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    @classmethod
    def ranges(cls, files: list[Path]) -> list[tuple[Path, int, int]]:
        """(file, start, end) spans of 8 blocks, in file order: the threads take them front to back."""
        span = cls.BLOCK * 8
        return [(f, start, min(start + span, f.stat().st_size))
                for f in files for start in range(0, f.stat().st_size, span)]  # fmt: skip

    def stop(self) -> None:
        """Stop after the block in flight (at most one 16 MiB read per thread) and wait for the threads."""
        self._stop.set()
        for t in self._threads:
            t.join()

    def join(self) -> None:
        """Wait until everything is read."""
        for t in self._threads:
            t.join()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads from ``directory``: the index's shards, or ``model.safetensors``.
    Other copies some repositories ship beside them (``consolidated.safetensors``) are not read."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        import json

        return [
            directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def _available_memory() -> int:
    """MemAvailable, capped by this cgroup's memory limit (a pod's page cache counts against it)."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0  # unknown: no prefetch
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DistributedDataParallel wrapper, if any."""
    return model.module if hasattr(model, "module") else model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
