"""A test server run as a child process in its own session: log file, stop (the whole process group), context."""

from __future__ import annotations

import os
import signal
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self


class ServerProcess(ABC):
    """Subclasses set ``log_path`` and ``_proc`` (in ``start``, which returns ``self``)."""

    log_path: Path
    _proc: subprocess.Popen | None = None

    @abstractmethod
    def start(self) -> Self:
        """Start the child (setting ``_proc``), wait until it answers, return ``self``."""

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
