"""Atomic checkpoints: ``<output_dir>/checkpoints/step_N/{policy/, training_state.pt, config.yaml, manifest.json}``.

A checkpoint is written into ``checkpoints/.tmp-step_N-<pid>/`` and renamed into place only when
every file is written and flushed, so a ``step_N`` directory is always complete; ``manifest.json``
(written last) lists each file's size and SHA-256 and is checked on resume. A killed save leaves a
``.tmp-*`` directory that resume ignores and the next save removes. Only global rank 0 calls these.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from trainer.errors import UserError

MANIFEST = "manifest.json"


class CheckpointWriteError(UserError):
    """The checkpoint directory cannot be written (read-only, full): the run stops, earlier checkpoints stay."""

    exit_code = 1


_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], config_yaml: str,
         keep_last: int) -> Path:  # fmt: skip
    import torch

    root = checkpoints_dir(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(str(root), f"cannot create the checkpoint directory: {e}") from None
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    final = root / f"step_{step}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        torch.save(state, tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        _write_manifest(tmp, step)
        _fsync_tree(tmp)
        old = None
        if final.exists():  # a re-save of the same step: keep a complete copy until the new one is in place
            old = root / f".tmp-old-step_{step}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for _, p in complete_checkpoints(root)]
        raise CheckpointWriteError(
            str(root), f"cannot write checkpoint step_{step}: {e}",
            hint=f"free space or fix permissions, then rerun to resume; earlier checkpoints are intact: {kept or 'none'}",
        ) from None  # fmt: skip
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    for _, path in complete_checkpoints(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def set_aside_newer(output_dir: str | Path, resume_from: Path) -> list[str]:
    """Move checkpoints newer than ``resume_from`` (an abandoned timeline) to ``checkpoints/abandoned/``.

    Otherwise ``keep_last`` would prune the new run's checkpoints as "older", and a later ``resume: auto``
    would jump back to the abandoned timeline.
    """
    root = checkpoints_dir(output_dir)
    if resume_from.parent.resolve() != root.resolve():
        return []
    step = int(resume_from.name.split("_")[1])
    moved = []
    for s, path in complete_checkpoints(root):
        if s > step:
            dest = root / "abandoned" / f"{path.name}-{int(time.time())}"
            dest.parent.mkdir(exist_ok=True)
            os.replace(path, dest)
            moved.append(path.name)
    return moved


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of directories named ``step_N`` with a manifest, newest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / MANIFEST).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def latest(output_dir: str | Path, verify: bool = True) -> Path | None:
    """The newest checkpoint whose files match its manifest; damaged ones are skipped with a warning."""
    for _, path in complete_checkpoints(checkpoints_dir(output_dir)):
        problem = verify_manifest(path) if verify else None
        if problem is None:
            return path
        print(f"warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def verify_manifest(path: Path) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} checksum mismatch"
    return None


def load_state(path: Path) -> dict[str, Any]:
    import torch

    # weights_only=False: the state holds RNG states and plain Python objects we wrote ourselves.
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to continue from, per ``checkpoint.resume``."""
    if resume == "never":
        existing = complete_checkpoints(checkpoints_dir(output_dir))
        if existing:
            raise UserError(
                f"checkpoint.resume: never: {checkpoints_dir(output_dir)}",
                f"holds {len(existing)} checkpoint(s) that a fresh run would mix with its own",
                hint="use another output_dir or name, delete the old run, or set checkpoint.resume: auto",
            )
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if path.name == "policy":
        path = path.parent
    problem = (
        verify_manifest(path)
        if (path / MANIFEST).is_file()
        else "no manifest.json (not a complete checkpoint)"
    )
    if problem:
        raise UserError(f"checkpoint.resume: {resume}", problem)
    return path


def _write_manifest(tmp: Path, step: int) -> None:
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
