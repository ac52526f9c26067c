"""A multi-turn run inside a long-lived process gives back what it opened.

``api.train`` is how notebooks, sweeps and tests train in one process, run after run. A run must not
leave its API cache's SQLite connection open: three descriptors (the database, ``-wal``, ``-shm``)
per run, and the newest cached answers would sit only in the ``-wal`` file, not in
``api_cache.sqlite`` itself.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "intentiongym.yaml"


def _open_files_under(root: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(root)):
            out.append(target)
    return out


def test_a_run_in_process_closes_its_api_cache_and_loop(
    tmp_path: Path, tiny_model: Path, chain: Any, soak: ModuleType
) -> None:
    from trainer import api
    from trainer.config import load_config

    threads_before = {t.ident for t in threading.enumerate()}
    overrides = soak.run_overrides(tmp_path, tiny_model, chain.api_base, chain.server.model, max_steps=1)
    result = api.train(load_config(CONFIG, overrides))
    assert result.status == "success" and result.steps == 1
    out = tmp_path / "run"
    assert (out / "api_cache.sqlite").is_file()
    assert _open_files_under(out) == []
    assert not (out / "api_cache.sqlite-wal").exists()  # checkpointed into the database on close
    # The run's event-loop thread is gone too.
    left = [t.name for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert left == []
