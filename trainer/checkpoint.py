"""Atomic checkpoints: ``<output_dir>/checkpoints/step_N/{policy/, training_state.pt, config.yaml, manifest.json}``.

A checkpoint is written into ``checkpoints/.tmp-step_N-<pid>/`` and renamed into place only when
every file is written and flushed, so a ``step_N`` directory is always complete; ``manifest.json``
(written last) lists each file's size and SHA-256 and is checked on resume. A killed save leaves a
``.tmp-*`` directory that resume ignores and the next save removes. Only global rank 0 calls these.

``BackgroundSaver`` overlaps a save with training (issue 6): at the save point it copies the weights,
the optimizer state and the tokenizer's files into host memory (buffers allocated at the first save and
reused), then runs the same ``save`` on those copies in a thread while the next steps train. One save
is in flight at most; ``wait`` joins it and re-raises its ``CheckpointWriteError`` on the training thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
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
         keep_last: int, extra_models: dict[str, tuple[Any, dict[str, Any] | None]] | None = None) -> Path:  # fmt: skip
    """``extra_models``: ``{name: (model, state)}`` written as ``<name>/`` (``save_pretrained``) with ``state`` (e.g.
    its optimizer's) in ``<name>/training_state.pt``, inside the same atomic directory and manifest (PPO's critic)."""
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
        for name, (extra, extra_state) in (extra_models or {}).items():
            extra.save_pretrained(tmp / name, safe_serialization=True)
            if extra_state is not None:
                torch.save(extra_state, tmp / name / "training_state.pt")
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


class _HostModel:
    """Stands in for the model in ``save``: writes the host copy of its weights, not the live (training) ones."""

    def __init__(self, model, state_dict: dict[str, Any]):
        self._model = model
        self._state_dict = state_dict

    def save_pretrained(self, path: Path, **kwargs: Any) -> None:
        # PEFT filters the given state dict down to the adapter; transformers drops the tied duplicates.
        self._model.save_pretrained(path, state_dict=self._state_dict, **kwargs)


class _TokenizerFiles:
    """Stands in for the tokenizer in ``save``: its files, serialised once (it never changes during a run).

    The training thread keeps encoding while the writer runs; a fast tokenizer's Rust object refuses a
    concurrent borrow ("Already borrowed"), so the writer never touches the live one.
    """

    def __init__(self, tokenizer):
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            self.files = {p.relative_to(d): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}

    def save_pretrained(self, path: Path) -> None:
        for rel, data in self.files.items():
            (Path(path) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(path) / rel).write_bytes(data)


class BackgroundSaver:
    """Host snapshot at the save point, ``save`` in a thread; at most one save in flight.

    ``start`` waits for the previous save first (so its buffers are free again and its error is not lost),
    copies, and returns; ``wait`` joins and raises the write's ``CheckpointWriteError``, if any. Host
    buffers are kept between saves: the copy then costs one memcpy of the weights (and, for full fine-tuning,
    AdamW's two moments), not fresh allocations and page faults every time.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}
        self._tokenizer: tuple[int, _TokenizerFiles] | None = None
        self._thread: threading.Thread | None = None
        self._result: Path | BaseException | None = None
        self.snapshot_s = 0.0  # training-thread time of the last snapshot (what a step waits for)

    @property
    def in_flight(self) -> bool:
        """A save was started and not yet joined (it may have finished writing)."""
        return self._thread is not None

    @property
    def writing(self) -> bool:
        """The writer thread is still at work."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any],
              config_yaml: str, keep_last: int,
              extra_models: dict[str, tuple[Any, dict[str, Any] | None]] | None = None) -> None:  # fmt: skip
        self.wait()
        t0 = time.perf_counter()
        host_model = _HostModel(model, self._copy_model(model))
        host_state = self._copy("state", state)
        host_extra = {name: (_HostModel(m, self._copy_model(m, name)), self._copy(f"{name}/state", st))
                      for name, (m, st) in (extra_models or {}).items()}  # fmt: skip
        if self._tokenizer is None or self._tokenizer[0] != id(tokenizer):
            self._tokenizer = (id(tokenizer), _TokenizerFiles(tokenizer))
        files = self._tokenizer[1]
        self.snapshot_s = time.perf_counter() - t0

        def run() -> None:
            # The lowest CPU priority for this thread only (Linux: a thread id is a PRIO_PROCESS target). On a
            # CPU-bound host the write's serialisation and hashing then take the cycles training leaves, instead
            # of descheduling one of torch's OpenMP threads, which stalls every parallel region at its barrier.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            try:
                self._result = save(output_dir, step, host_model, files, host_state, config_yaml, keep_last,
                                    host_extra)  # fmt: skip
            except BaseException as e:  # re-raised on the training thread by wait()
                self._result = e

        self._result = None
        self._thread = threading.Thread(target=run, name=f"userloop-save-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Path | None:
        """Join the save in flight (if any); its path, or its error raised here."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        return result

    def _copy_model(self, model, prefix: str = "model") -> dict[str, Any]:
        import torch

        # Frozen weights (a LoRA run's base model) never change: they are referenced, not copied. Tied weights
        # (embeddings and LM head) stay one tensor, so the file holds them once, as save_pretrained writes them.
        frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
        out: dict[str, Any] = {}
        seen: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        for name, t in model.state_dict().items():
            key = (t.data_ptr(), tuple(t.shape))
            if key in seen:
                out[name] = seen[key]
            elif t.data_ptr() in frozen and t.device.type == "cpu":
                out[name] = seen[key] = t
            else:
                out[name] = seen[key] = self._buffer(f"{prefix}/{name}", t)
        return out

    def _copy(self, path: str, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            return self._buffer(path, value)
        if isinstance(value, dict):
            return {k: self._copy(f"{path}/{k}", v) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._copy(f"{path}/{i}", v) for i, v in enumerate(value))
        return value  # numbers, strings: immutable; the other containers are rebuilt at every save

    def _buffer(self, key: str, t: Any) -> Any:
        import torch

        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._buffers[key] = buf
        buf.copy_(t.detach())
        return buf


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


def step_of(path: Path) -> int | None:
    """The optimizer step a checkpoint holds: its manifest's, else its ``step_N`` name; None if neither says."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads((path / MANIFEST).read_text())["step"])
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


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
