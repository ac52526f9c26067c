"""One long-lived asyncio event loop in a dedicated thread, beside the training loop.

All API work of a run (user-simulator turns, judge calls, every episode's coroutine) runs here as
concurrent tasks; the training thread hands coroutines over with ``submit`` and gets a
``concurrent.futures.Future`` back. One loop for the whole run, not one ``asyncio.run`` per call:
HTTP connections, semaphores and rate-limit buckets live as long as the run (CONTEXT §6).

    loop = LoopThread()
    fut = loop.submit(client.complete(messages))      # returns at once
    result = fut.result(timeout=120)                   # blocks the caller only
    loop.close()

Blocking work (local-model generation) must not run on this loop: use ``run_in_executor``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread until ``close``."""

    def __init__(self, name: str = "userloop-api"):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; thread-safe, returns immediately."""
        if self._closed:
            coro.close()
            raise RuntimeError("LoopThread is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any thread but the loop's own)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "LoopThread.run called from the loop thread itself: await the coroutine instead"
            )
        return self.submit(coro).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is still running, stop the loop and join the thread."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        # A loop already stopped or a task that ignores cancellation must not keep the run from exiting.
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
