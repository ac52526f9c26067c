"""Paths and constants shared by the launcher tests (a uniquely named module: `conftest` is ambiguous
when several test folders have one)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
FIXED_TIME = datetime(2025, 1, 2, 3, 4, tzinfo=timezone.utc)


def all_configs() -> list[Path]:
    """Every config under configs/, recursively (a top-level-only walk misses nested ones), plus the fixtures."""
    return sorted((REPO / "configs").rglob("*.yaml")) + sorted(DATA.glob("*.yaml"))
