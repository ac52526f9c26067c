"""Sharded checkpoints (``parallel.strategy: fsdp``): every rank writes its own shards, atomically as ever.

The layout is ``trainer.checkpoint``'s, plus one directory::

    checkpoints/step_N/
      policy/             save_pretrained (full model or LoRA adapter) + tokenizer: gathered one tensor at a time
                          and written by rank 0 (``trainer.parallel.save_pretrained``), loadable as before
      critic/             PPO: the same, for the critic
      dcp/                torch.distributed.checkpoint: .metadata + __<rank>_0.distcp, one file per rank, holding
                          {"policy": {"model", "optimizer"}, "critic": {...}}: the trained parameters (all of them for
                          full fine-tuning, the adapter under LoRA) and AdamW's state, as DTensor shards
      training_state.pt   data position, step, RNG states of every rank, config (no optimizer: it is in dcp/)
      config.yaml, manifest.json

Atomic as ``trainer.checkpoint.save``: all ranks write into rank 0's ``.tmp-step_N-<pid>`` (its pid is
broadcast, so every rank names the same directory: one filesystem, the PVC, for a multi-node run), rank 0
writes the rest, then the manifest over every rank's files, fsyncs and renames. Every rank learns whether
any rank failed (``any_rank``), so all stop together or none does.

Resume (``restore``): DCP reshards on load, so a checkpoint of N processes resumes on M, sharded or not
(``parallel: ddp`` and a single process included: the shards are read into whole tensors). A DDP checkpoint
(its optimizer in ``training_state.pt``, keyed by parameter position) resumes under FSDP through
``restore_positional``: each rank keeps its shard of the full state (an ``auto`` strategy may change when the
GPU count does). RNG streams are restored per rank where the rank existed before; the data order is the
same at any world size (``Session.batches``), but with another process count each rank's samples differ.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, parallel
from trainer.checkpoint import CheckpointWriteError
from trainer.model import unwrap

DCP_DIR = "dcp"

Models = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]  # "policy" first, then extra models by name


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR / ".metadata").is_file()


def _options(model: torch.nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # A LoRA run's base is frozen and reloaded from model.path: only what trains goes into the shards.
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def _state_dicts(models: Models) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {}
    for name, (model, opt) in models.items():
        m = unwrap(model)
        out[name] = {"model": get_model_state_dict(m, options=_options(m)),
                     "optimizer": get_optimizer_state_dict(m, _inner(opt), options=_options(m))}  # fmt: skip
    return out


def save(output_dir: str | Path, step: int, models: Models, tokenizer, state: dict[str, Any], config_yaml: str,
         keep_last: int, any_rank: Callable[[bool], bool]) -> Path | None:  # fmt: skip
    """Write ``checkpoints/step_<step>`` from every rank (a collective); its path on rank 0, None elsewhere.
    Raises ``CheckpointWriteError`` on every rank when any rank could not write."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    main = dist.get_rank() == 0
    root = checkpoint.checkpoints_dir(output_dir)
    pid = [os.getpid()]
    dist.broadcast_object_list(pid, src=0)
    tmp, final = root / f".tmp-step_{step}-{pid[0]}", root / f"step_{step}"
    error: BaseException | None = None

    def agree(stage: str) -> None:
        if any_rank(error is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = [p.name for _, p in checkpoint.complete_checkpoints(root)] if main else []
            raise CheckpointWriteError(
                str(root), f"cannot write checkpoint step_{step} ({stage}): {error or 'failed on another rank'}",
                hint=f"free space or fix permissions, then rerun to resume; earlier checkpoints are intact: {kept or 'none'}",
            ) from None  # fmt: skip

    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    agree("creating the directory")
    for name, (model, _) in models.items():
        try:  # every rank gathers to the end even when rank 0's write failed: the gathers are collectives
            parallel.save_pretrained(model, tmp / name if main else None)
        except (OSError, RuntimeError) as e:
            error = e
    agree("the exported weights")
    try:
        dcp.save(_state_dicts(models), checkpoint_id=tmp / DCP_DIR)
    except Exception as e:  # DCP gathers the ranks' write errors into one CheckpointException on every rank
        error = e
    agree("the sharded state")
    if main:
        try:
            tokenizer.save_pretrained(tmp / "policy")
            torch.save(state, tmp / "training_state.pt")
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            _commit(root, tmp, final, step)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            error = e
    agree("the manifest")
    if main:
        checkpoint.prune(root, keep_last)
    return final if main else None


def _commit(root: Path, tmp: Path, final: Path, step: int) -> None:
    """Manifest over every rank's files, fsync, rename into place (as ``trainer.checkpoint.save``)."""
    checkpoint._write_manifest(tmp, step)
    checkpoint._fsync_tree(tmp)
    old = None
    if final.exists():  # a re-save of the same step: keep a complete copy until the new one is in place
        old = root / f".tmp-old-step_{step}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    checkpoint._fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore(path: Path, models: Models) -> None:
    """Load the trained weights and optimizer state of ``models`` from ``path/dcp`` (any world size; sharded
    or whole models). Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state_dicts(models)
    dcp.load(state, checkpoint_id=path / DCP_DIR)
    for name, (model, opt) in models.items():
        m = unwrap(model)
        set_model_state_dict(m, state[name]["model"], options=_options(m))
        set_optimizer_state_dict(m, _inner(opt), state[name]["optimizer"], options=_options(m))


def restore_positional(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Load a DDP checkpoint's optimizer state (torch's ``state_dict``: parameters by position in the
    optimizer's groups) into ``model``'s optimizer, sharded or not. The positions are those of the trained
    parameters in ``named_parameters`` order, which is how ``Session`` and PPO build their AdamW."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    m = unwrap(model)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    by_name = {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(m, _inner(optimizer), by_name, options=StateDictOptions(full_state_dict=True))
