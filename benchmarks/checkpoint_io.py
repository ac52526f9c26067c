"""Checkpoint I/O: ``trainer.checkpoint.save`` and ``from_pretrained`` against the disk's raw bandwidth.

A random-initialised model with Qwen3-0.6B's dimensions (built from ``Qwen3Config`` on the meta device
and filled with normal noise, bf16; no download) is saved with ``trainer.checkpoint.save`` (what
``Session.save`` calls: ``save_pretrained`` as safetensors, the tokenizer, ``training_state.pt``, a
SHA-256 manifest, fsync of every file, atomic rename, pruning to ``keep_last``) and loaded back with
``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` (what ``trainer.model`` calls). In the same
run, alternating with them (A B A B ...), a raw sequential write of as many bytes (16 MiB blocks, then
fsync) and a raw sequential read of that file give the disk's bandwidth.

Page cache: before a "cold" read, as root the whole page cache is dropped (``/proc/sys/vm/drop_caches``);
otherwise the file is evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)``, which without privileges does
not reliably evict (the second pass measured a memory-mapped "cold" read at 2.9 GB/s that way, 0.9 GB/s
after a real drop). "Warm" loads read the page cache. On a virtual disk the host may still cache below
the guest; the section says which eviction ran.

Blocking: a run's periodic saves go through ``checkpoint.BackgroundSaver`` (``checkpoint.background``):
the step waits for ``start`` (a copy of the weights into host buffers kept between saves, the tokenizer's
files serialised once) and the same ``save`` runs in a thread. Measured here: the time ``start`` blocks
(after a first save that allocated the buffers), the time until the background write is complete, and
a training-like busy loop (fp32 matmuls, ``torch.set_num_threads`` as above) timed while the write runs
against the same loop with nothing in the background: what the overlap costs the steps that run beside it.
Loads include reading one element per page of every weight, since safetensors may map the file lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import code_version, fmt, interleave, load_average, machine, median, utc_now, versions

HEADING = "## Checkpoint I/O"
BLOCK = 16 << 20


@dataclass(frozen=True)
class CkptSettings:
    # Qwen3-0.6B's dimensions (its config.json)
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    rounds: int = 3
    label: str = "Qwen3-0.6B-sized"
    drop_caches: bool = (
        True  # as root: drop the whole page cache for cold reads (never in the quick smoke run)
    )


FULL = CkptSettings()
QUICK = CkptSettings(vocab_size=4096, hidden_size=128, intermediate_size=256, layers=2, heads=4, kv_heads=2,
                     head_dim=32, rounds=1, label="tiny (quick setting)", drop_caches=False)  # fmt: skip


def build_model(s: CkptSettings):
    import torch
    from transformers import Qwen3ForCausalLM

    from benchmarks.common import qwen3_config

    config = qwen3_config(s, dtype="bfloat16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():  # rotary inv_freq: not saved; no uninitialised memory either
            b.zero_()
    model.tie_weights()
    return model


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


_ALLOW_DROP = [False]  # set by bench() from its settings


def eviction() -> str:
    """How "cold" reads are made cold here: the whole page cache dropped (root), else the file's pages."""
    can = _ALLOW_DROP[0] and os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)
    return "drop_caches" if can else "fadvise"


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache: with root the whole cache (``drop_caches``, what "cold"
    means), else ``posix_fadvise(DONTNEED)`` on its clean pages (no privileges; not always all of them)."""
    if eviction() == "drop_caches":
        os.sync()
        DROP_CACHES.write_text("1\n")
        return
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _touch(model) -> None:
    """Read one element per 4 KiB page of every parameter (forces lazily mapped weights in)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].float().sum()


def raw_write(path: Path, nbytes: int) -> float:
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(BLOCK, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    _evict(path)
    return dt


def raw_read(path: Path) -> float:
    _evict(path)
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def raw_read_mmap(path: Path) -> float:
    """Sequential read through a memory map, one byte per page (the access pattern of a lazy safetensors load)."""
    import mmap

    _evict(path)
    t0 = time.perf_counter()
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        m.madvise(mmap.MADV_SEQUENTIAL)
        total = 0
        for offset in range(0, len(m), mmap.PAGESIZE):
            total += m[offset]
    return time.perf_counter() - t0


def _blocking_lines(res: dict) -> list[str]:
    bg = res.get("background")
    if not bg:
        return [f"Step blocked by a save: {res['save_s']:.2f} s (synchronous save; background not measured)."]
    slower = bg["busy_beside_ms"] / bg["busy_alone_ms"] - 1
    return [
        "Step blocked by a save (`checkpoint.background: true`, the default: `BackgroundSaver.start` copies the state "
        "into host buffers kept between saves and a thread runs the save above):",
        "",
        "| | time (s) |",
        "|---|---:|",
        f"| synchronous save (`checkpoint.save`, the table above; before issue 6's change every periodic save) | "
        f"{res['save_s']:.2f} |",
        f"| **step blocked by a background save** (`BackgroundSaver.start`) | **{bg['blocked_s']:.2f}** |",
        f"| bare copy of the weights into preallocated buffers (the floor of that block) | {res['snapshot_s']:.2f} |",
        f"| background write until complete (start to join), a busy loop beside it for up to "
        f"{bg.get('window_s', float('nan')):.1f} s | {bg['written_s']:.2f} |",
        f"| of which waited at the join, after the loop stopped (what the next save point would wait) | "
        f"{bg.get('rest_s', float('nan')):.2f} |",
        "",
        f"The busy loop (8 fp32 384 x 384 matmuls per iteration, both cores) beside the background write: "
        f"{bg['busy_beside_ms']:.1f} ms per iteration against {bg['busy_alone_ms']:.1f} ms alone "
        f"({100 * slower:+.0f} %). The writer thread runs at the lowest CPU priority, so on a CPU that training keeps "
        f"busy it takes the leftover cycles and finishes at the next join; with spare cores (GPU training) it "
        f"runs beside the steps. Per round: blocked {bg['all_blocked']}, written {bg['all_written']}, waited at the "
        f"join {bg.get('all_rest')}.",
    ]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class PhaseTimer:
    """Wraps ``trainer.checkpoint``'s phases to time them (the module itself is unchanged)."""

    def __init__(self, model) -> None:
        from trainer import checkpoint

        self.times: dict[str, float] = {}
        self._ck = checkpoint
        self._orig = {"_write_manifest": checkpoint._write_manifest, "_fsync_tree": checkpoint._fsync_tree}
        self._model = model
        self._save_pretrained = model.save_pretrained

    def _wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def __enter__(self) -> PhaseTimer:
        self._ck._write_manifest = self._wrap("manifest (SHA-256)", self._orig["_write_manifest"])
        self._ck._fsync_tree = self._wrap("fsync", self._orig["_fsync_tree"])
        self._model.save_pretrained = self._wrap("save_pretrained", self._save_pretrained)
        return self

    def __exit__(self, *exc: object) -> None:
        self._ck._write_manifest = self._orig["_write_manifest"]
        self._ck._fsync_tree = self._orig["_fsync_tree"]
        del self._model.save_pretrained


def bench(s: CkptSettings, threads: int, directory: str | None = None, log=print) -> dict:
    import torch

    _ALLOW_DROP[0] = s.drop_caches
    from transformers import AutoModelForCausalLM

    from trainer import checkpoint
    from trainer.model import quiet_libraries
    from trainer.tiny import build_tokenizer

    quiet_libraries()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="userloop-bench-ckpt-", dir=directory))
    try:
        t0 = time.perf_counter()
        model = build_model(s)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"ckpt: built {n_params:,} parameters in {time.perf_counter() - t0:.1f} s")
        tokenizer = build_tokenizer()
        state = {"state": {"step": 0}, "rng": [{"torch": torch.get_rng_state()}]}
        out = work / "run"
        raw = work / "raw.bin"
        phases: list[dict[str, float]] = []
        saved: list[Path] = []

        def save(r: int) -> float:
            with PhaseTimer(model) as pt:
                t = time.perf_counter()
                path = checkpoint.save(out, r + 1, model, tokenizer, state, "name: bench\n", keep_last=1)
                dt = time.perf_counter() - t
            phases.append(pt.times)
            saved.append(path)
            _evict(path)
            return dt

        save(-1)  # warm-up: imports, safetensors' first use; step_0, pruned by the next save
        weights = saved[-1] / "policy" / "model.safetensors"
        nbytes = weights.stat().st_size
        phases.clear()
        writes = interleave({"save": save, "raw_write": lambda _: raw_write(raw, nbytes)}, s.rounds)
        ckpt_bytes = _size(saved[-1])
        policy = saved[-1] / "policy"

        from trainer.model import from_pretrained

        def load(cold: bool, prefetch: bool = True) -> float:
            if cold:
                _evict(saved[-1])
            else:  # the raw reads before may have dropped the whole cache: read the files in, untimed
                for f in policy.iterdir():
                    f.read_bytes()
            t = time.perf_counter()
            if prefetch:  # what a run does (trainer.model: from_pretrained with the prefetch threads)
                loaded = from_pretrained(policy, torch.bfloat16)
            else:
                loaded = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16)
            _touch(loaded)  # safetensors may leave tensors memory-mapped: make every page be read
            dt = time.perf_counter() - t
            del loaded
            return dt

        reads = interleave({"load_cold": lambda _: load(True), "load_cold_plain": lambda _: load(True, False),
                            "raw_read": lambda _: raw_read(raw),
                            "raw_read_mmap": lambda _: raw_read_mmap(raw), "load_warm": lambda _: load(False)},
                           s.rounds)  # fmt: skip

        tensors = list({v.data_ptr(): v for v in model.state_dict().values()}.values())  # tied: once
        buffers = [torch.empty_like(v) for v in tensors]
        for b in buffers:
            b.zero_()  # allocated and faulted in once, at start-up, as an async saver would

        def snapshot(_: int) -> float:
            t = time.perf_counter()
            for b, v in zip(buffers, tensors, strict=True):
                b.copy_(v)
            return time.perf_counter() - t

        snap = interleave({"snapshot": snapshot}, s.rounds)["snapshot"]
        buffers.clear()
        overlap = background(s, model, tokenizer, state, work / "bg")
        phase_med = {k: median([p.get(k, 0.0) for p in phases]) for k in phases[0]} if phases else {}
        res = {
            "settings": asdict(s), "threads": threads, "parameters": n_params, "weights_bytes": nbytes,
            "checkpoint_bytes": ckpt_bytes, "dir": str(work.parent),
            "save_s": median(writes["save"]), "raw_write_s": median(writes["raw_write"]),
            "load_cold_s": median(reads["load_cold"]), "load_cold_plain_s": median(reads["load_cold_plain"]), "load_warm_s": median(reads["load_warm"]),
            "raw_read_s": min(median(reads["raw_read"]), median(reads["raw_read_mmap"])),
            "raw_read_file_s": median(reads["raw_read"]), "raw_read_mmap_s": median(reads["raw_read_mmap"]), "snapshot_s": median(snap), "phases": phase_med,
            "all": {k: [round(x, 3) for x in v] for k, v in {**writes, **reads, "snapshot": snap}.items()},
            "background": overlap,
            "machine": machine(), "eviction": eviction(), "load": load_average(), "when": utc_now(), "code": code_version(),
        }  # fmt: skip
        log(f"ckpt: {res['all']}")
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def background(s: CkptSettings, model, tokenizer, state: dict, out: Path) -> dict:
    """Blocking time of ``BackgroundSaver.start``, its write time, and a busy loop beside it vs alone."""
    import torch

    from trainer import checkpoint

    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def busy_iteration() -> float:
        t = time.perf_counter()
        for _ in range(8):
            a @ b
        return time.perf_counter() - t

    saver = checkpoint.BackgroundSaver()
    saver.start(out, 0, model, tokenizer, state, "name: bench\n", keep_last=1)  # allocates the host buffers
    saver.wait()
    t0 = time.perf_counter()
    alone = [busy_iteration() for _ in range(50)]
    # The loop runs beside the write for as long as a synchronous save takes (the write's thread has the lowest
    # CPU priority: on a CPU kept busy it finishes only once the loop stops, so looping "until written" would
    # never end), then waits for the rest of the write, as the next save point would.
    window = max(2.0, 2 * (time.perf_counter() - t0))
    blocked, written, rest, beside = [], [], [], []
    for r in range(s.rounds):
        t0 = time.perf_counter()
        saver.start(out, r + 1, model, tokenizer, state, "name: bench\n", keep_last=1)
        blocked.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        while saver.writing and time.perf_counter() - t1 < window:
            beside.append(busy_iteration())
        t2 = time.perf_counter()
        saver.wait()
        rest.append(time.perf_counter() - t2)
        written.append(time.perf_counter() - t0)
        alone += [busy_iteration() for _ in range(50)]  # alone between the rounds too: drift hits both
    return {"blocked_s": median(blocked), "written_s": median(written), "rest_s": median(rest),
            "window_s": window, "busy_alone_ms": 1000 * median(alone),
            "busy_beside_ms": 1000 * median(beside) if beside else float("nan"),
            "all_blocked": [round(x, 3) for x in blocked], "all_written": [round(x, 3) for x in written],
            "all_rest": [round(x, 3) for x in rest]}  # fmt: skip


def section(res: dict, command_line: str) -> str:
    cold_how = (
        "the whole page cache dropped first (`/proc/sys/vm/drop_caches`, as root; the virtual disk's host may still "
        "cache below the guest)."
        if res.get("eviction") == "drop_caches"
        else "every file evicted with `posix_fadvise(DONTNEED)` first (not root: the page cache could not be "
        "dropped, and that eviction is not reliable)."
    )
    s = res["settings"]
    mb = res["weights_bytes"] / 1e6
    mbps = lambda nbytes, sec: nbytes / 1e6 / sec  # noqa: E731
    w_raw, r_raw = (
        mbps(res["weights_bytes"], res["raw_write_s"]),
        mbps(res["weights_bytes"], res["raw_read_s"]),
    )
    save_bw = mbps(res["weights_bytes"], res["save_s"])
    plain_bw = mbps(res["weights_bytes"], res["load_cold_plain_s"])
    cold_bw, warm_bw = (
        mbps(res["weights_bytes"], res["load_cold_s"]),
        mbps(res["weights_bytes"], res["load_warm_s"]),
    )
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in res["phases"].items())
    lines = [
        HEADING,
        "",
        f"Measured {res['when']} ({res['code']}) with `{command_line}` (load average at the end {res['load']}).",
        f"Machine: {res['machine']}; files under `{res['dir']}`. {versions('torch', 'transformers', 'safetensors')}. "
        f"`torch.set_num_threads({res['threads']})`.",
        "",
        f"Model: {s['label']} Qwen3 (`Qwen3Config`: vocab {s['vocab_size']}, hidden {s['hidden_size']}, "
        f"intermediate {s['intermediate_size']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, head_dim "
        f"{s['head_dim']}, tied embeddings), random normal weights, bf16: {res['parameters']:,} parameters, "
        f"model.safetensors {mb:,.0f} MB (checkpoint directory {res['checkpoint_bytes'] / 1e6:,.0f} MB). Save: "
        "`trainer.checkpoint.save` (safetensors + tokenizer + a small training_state.pt + SHA-256 manifest + fsync "
        "+ atomic rename + pruning to keep_last=1; no optimizer state: a full fine-tuning checkpoint adds AdamW's "
        "two fp32 moments, 4x the bf16 weights, through `torch.save`). Load: `trainer.model.from_pretrained` (prefetch threads + `AutoModelForCausalLM.from_pretrained"
        "(dtype=bfloat16)`; the bare transformers call beside it) plus a read of one element per 4 KiB page of every weight (safetensors may map lazily). Raw: sequential 16 MiB writes of as many bytes as model.safetensors, then fsync; "
        f"sequential reads, as 16 MiB `read()` calls and through a memory map (safetensors' way), the faster counting. Cold reads: {cold_how} "
        f"{s['rounds']} interleaved rounds (save, raw write, ...; cold load, cold load without the prefetch, raw read, raw read through a memory map, warm load, ...), medians. "
        "Bandwidths are model.safetensors bytes over the time. Target: >= 0.5 of raw.",
        "",
        "| operation | time (s) | MB/s | vs raw |",
        "|---|---:|---:|---:|",
        f"| raw sequential write + fsync | {res['raw_write_s']:.2f} | {w_raw:.0f} | 1.00 |",
        f"| `checkpoint.save` | {res['save_s']:.2f} | {save_bw:.0f} | {fmt(save_bw / w_raw)} |",
        f"| raw sequential read (cold; the faster of `read()` 16 MiB blocks, {res['raw_read_file_s']:.2f} s, "
        f"and a memory map touched page by page, {res['raw_read_mmap_s']:.2f} s) | {res['raw_read_s']:.2f} | "
        f"{r_raw:.0f} | 1.00 |",
        f"| `trainer.model.from_pretrained` (cold; what a run calls: prefetch threads + transformers) | "
        f"{res['load_cold_s']:.2f} | {cold_bw:.0f} | {fmt(cold_bw / r_raw)} |",
        f"| `AutoModelForCausalLM.from_pretrained` alone (cold) | {res['load_cold_plain_s']:.2f} | "
        f"{plain_bw:.0f} | {fmt(plain_bw / r_raw)} |",
        f"| `trainer.model.from_pretrained` (warm page cache) | {res['load_warm_s']:.2f} | {warm_bw:.0f} | {fmt(warm_bw / r_raw)} |",
        "",
        f"Save phases (median): {phases}; the rest is the tokenizer, training_state.pt, rename and pruning.",
        "",
        *_blocking_lines(res),
        "",
        f"Per-round times (s): {res['all']}.",
    ]
    return "\n".join(lines) + "\n"
