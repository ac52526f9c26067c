"""Cold-start time of the launcher's offline commands: `launcher --help`, `launcher render`, `launcher validate`.

Each command runs as a fresh process (what a user and CI pay), several times; the median is reported.
With ``--write`` the table replaces the "Launcher cold start" section of docs/benchmarks.md (the rest
of the file is left alone). Target: render under 1 s.

    python benchmarks/launcher_cold_start.py --runs 7 --write
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
HEADING = "## Launcher cold start"


def _launcher() -> str:
    found = Path(sys.executable).parent / "launcher"
    return str(found) if found.exists() else (shutil.which("launcher") or "launcher")


def _time(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, KUBECONFIG="/nonexistent")
        )
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return times


def measure(runs: int) -> list[tuple[str, float, float]]:
    exe = _launcher()
    render_config = REPO / "tests" / "launcher" / "data" / "sidecar.yaml"
    validate_config = REPO / "configs" / "quickstart.yaml"
    with tempfile.TemporaryDirectory() as out:
        commands = {
            "`launcher --help`": [exe, "--help"],
            "`launcher render tests/launcher/data/sidecar.yaml -o DIR` (renders + validates: k8s schemas, CRD)": [
                exe, "render", str(render_config), "-o", out,
            ],
            "`launcher validate configs/quickstart.yaml`": [exe, "validate", str(validate_config)],
        }  # fmt: skip
        _time(
            commands["`launcher --help`"], 1
        )  # warm the OS file cache; cold = new interpreter, not cold disk
        rows = []
        for name, cmd in commands.items():
            times = _time(cmd, runs)
            rows.append((name, statistics.median(times), min(times)))
    return rows


def table(rows: list[tuple[str, float, float]], runs: int, command: str | None = None) -> str:
    command = command or f"python benchmarks/launcher_cold_start.py --runs {runs} --write"
    lines = [
        HEADING,
        "",
        f"Fresh process each time, median of {runs} runs (`{command}`).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Targets (issue 6): `--help` 0.3 s, render 1 s, validate 1 s.",
        "",
        "| command | median (s) | min (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {med:.2f} | {low:.2f} |" for name, med, low in rows]
    return "\n".join(lines) + "\n"


def write(section: str) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    section = table(measure(args.runs), args.runs)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()
