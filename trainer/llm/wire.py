"""Frames between the trainer and its API worker process: a 4-byte length, then a pickled tuple.

Both ends are userloop's own code over an anonymous pipe, so pickle is safe here and the cheapest codec
for the small tuples that cross (a call's messages and settings one way, a result's fields and counters
the other; never a key). Reads block in a thread of their own on each side, never on an event loop.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from typing import Any

_HEADER = struct.Struct("<I")


class FrameWriter:
    """Writes whole frames to a pipe from any thread (a lock keeps frames from interleaving)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
        with self._lock:
            while view:
                view = view[os.write(self.fd, view) :]


def read_frame(fd: int) -> tuple[Any, ...] | None:
    """The next frame from ``fd``; None at end of file (the other side closed or died)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
