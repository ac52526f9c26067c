"""What every benchmark shares: interleaved timing, medians, the machine's description, the doc's sections.

- ``interleave(commands, rounds)`` runs compared commands A B C A B C ... so that drift of a shared
  machine (other jobs, thermal state, page cache) lands on every command alike, and returns each one's
  results in order.
- ``machine()`` and ``versions()`` describe where and with what a table was measured.
- ``write_section(heading, text)`` replaces one ``## heading`` section of docs/benchmarks.md and leaves
  the others alone (hand-written sections included).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleave(commands: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, list[Any]]:
    """Call ``commands[name](round)`` for every name, round after round (A B A B ...)."""
    results: dict[str, list[Any]] = {name: [] for name in commands}
    for r in range(rounds):
        for name, fn in commands.items():
            results[name].append(fn(r))
    return results


@dataclass
class Timed:
    """One subprocess run: its wall time as the caller saw it, and what it wrote."""

    wall_s: float
    returncode: int
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_timed(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 900
) -> Timed:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return Timed(wall, out.returncode, out.stdout, out.stderr)


def bench_env(threads: int) -> dict[str, str]:
    """The environment of every timed subprocess: the same thread count for all, offline, quiet."""
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem = f", {mem_gib:.0f} GiB RAM"
    except (ValueError, OSError):
        mem = ""
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, {platform.system()} {platform.release()}, no GPU" + (
        "" if not _has_cuda() else " (CUDA present)"
    )


def _has_cuda() -> bool:
    return "torch" in sys.modules and sys.modules["torch"].cuda.is_available()


def versions(*names: str) -> str:
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def code_version() -> str:
    """The commit measured (read-only git calls), and whether trainer/ or launcher/ had uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "launcher"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    return f"commit {rev or 'unknown'}" + (" + uncommitted changes in trainer/ or launcher/" if dirty else "")


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_section(heading: str, text: str, docs: Path = DOCS) -> None:
    """Replace the ``heading`` section of ``docs`` with ``text`` (append it when missing)."""
    doc = docs.read_text(encoding="utf-8") if docs.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = text.rstrip("\n") + "\n"
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text + "\n", doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    docs.write_text(doc.rstrip("\n") + "\n", encoding="utf-8")


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:.{digits}f}"


def qwen3_config(s: Any, **extra: Any):
    """A ``Qwen3Config`` of the dimensions in ``s`` (``vocab_size``, ``hidden_size``, ``intermediate_size``,
    ``layers``, ``heads``, ``kv_heads``, ``head_dim``) with Qwen3-0.6B's other settings (its config.json)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       head_dim=s.head_dim, max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, **extra)  # fmt: skip
