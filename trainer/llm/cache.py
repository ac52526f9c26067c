"""A SQLite cache of deterministic LLM calls (temperature 0), so a resumed run does not pay twice.

litellm's own response cache crashed on the first hit in 1.106 (CONTEXT §6), hence this one. The
key is a SHA-256 of the endpoint, model, messages and generation parameters; the API key is never
part of the key or the value. Only successful (and, when the caller parses, parseable) replies are
stored: a failure is retried on the next run instead of being remembered.

One file, ``<output_dir>/api_cache.sqlite``, shared by all backends of a run. WAL mode lets the
trainer's processes read while one writes; calls are tiny, so they run inline on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE_FILE = "api_cache.sqlite"


def cache_key(endpoint: str, model: str, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
    payload = json.dumps(
        {"endpoint": endpoint, "model": model, "messages": list(messages), "params": params},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    """``get(key) -> (text, prompt_tokens, completion_tokens) | None`` and ``put``; thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )
            self._db.commit()

    def get(self, key: str) -> tuple[str, int, int] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
            ).fetchone()
        return (row[0], int(row[1] or 0), int(row[2] or 0)) if row else None

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (key, text, prompt_tokens, completion_tokens, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
