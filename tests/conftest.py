"""Shared fixtures: the tiny model (built once per session) and run configs that point at temporary dirs."""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per process: the tiny models gain nothing from more, and on a 2-core CI machine
# spinning OpenMP threads of concurrent processes (a trainer subprocess, the test server) slowed
# training tests 4-10x. Set before anything imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart_single_turn.yaml"  # the one-turn GRPO config most tests build on


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    build_tiny_model(path)
    return path


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path):
    """Write a quickstart-based config into ``tmp_path`` with ``changes`` (dotted keys) applied; return its path."""

    def make(name: str = "t", **changes) -> Path:
        raw = yaml.safe_load(QUICKSTART.read_text())
        raw["name"] = name
        raw["output_dir"] = str(tmp_path / "runs" / "{name}")
        raw["model"]["path"] = str(tiny_model)
        raw["model"].pop("create_if_missing", None)
        raw["data"]["train"]["path"] = str(tmp_path / "data" / "train.jsonl")
        raw["data"]["val"]["path"] = str(tmp_path / "data" / "val.jsonl")
        for key, value in changes.items():
            node = raw
            parts = key.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make
