"""Paths and constants shared by the launcher tests (a uniquely named module: `conftest` is ambiguous
when several test folders have one)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
FIXED_TIME = datetime(2025, 1, 2, 3, 4, tzinfo=timezone.utc)


def all_configs() -> list[Path]:
    """Every config under configs/, recursively (a top-level-only walk misses nested ones), plus the fixtures."""
    return sorted((REPO / "configs").rglob("*.yaml")) + sorted(DATA.glob("*.yaml"))


def check_golden(rendered: Any, golden: Path) -> None:
    """``rendered`` (a ``launcher.render.Rendered``) equals the reviewed manifest in ``golden``; UPDATE_GOLDEN=1
    rewrites the file after a deliberate chart change. The resolved config inside the ConfigMap grows with
    every config field, so it is checked by its own tests and left out here."""
    rendered.by_kind("ConfigMap")[0]["data"]["config.yaml"] = "<the resolved run config>\n"
    text = rendered.to_yaml()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), (
        "rendered manifests changed: review, bump the chart version, UPDATE_GOLDEN=1"
    )
