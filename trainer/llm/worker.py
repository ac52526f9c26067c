"""The API worker process: ``python -m trainer.llm.worker REQUEST_FD REPLY_FD`` (started by ``ApiWorker``).

Hosts the ``ApiClient`` (litellm) of every ``backend: api`` role of one trainer process on an event loop of
its own, so retries, backoff, rate buckets, concurrency limits and litellm's several milliseconds of Python
per call never hold the training loop's GIL (issue 6). Requests, in ``wire`` frames:

    ("open", client_id, config, role, seed)           # config: the ApiBackendConfig (or subclass) itself
    ("call", request_id, client_id, model, messages, temperature, max_tokens, first_attempt)
    ("probe", request_id, client_id)                  # the run-start check of the endpoint
    ("exit",)

and each call is answered with ``("result", request_id, call_result_fields, stats_delta)``, each probe with
``("result", request_id, probe_result_fields, None)``, or either with ``("crash", request_id, text)`` for a
bug in here. Keys are read from the environment variable the config names, inherited from the trainer; they
never cross the pipe.

It exits when the trainer says so, when the request pipe reaches end of file (the trainer closed it or
died, SIGKILL included) or when its parent process changes (checked every second, in case another
process inherited the pipe); SIGINT and SIGTERM are ignored so that a signal to the whole process group
cannot cut off the calls of a step the trainer is still finishing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import threading
import traceback
from typing import Any

from trainer.llm.wire import FrameWriter, read_frame


class Worker:
    def __init__(self, request_fd: int, reply_fd: int):
        self.request_fd = request_fd
        self.out = FrameWriter(reply_fd)
        self.loop = asyncio.new_event_loop()
        self.clients: dict[int, Any] = {}
        # client id -> why it could not be opened (the answer to each of its calls)
        self.broken: dict[int, str] = {}
        self.parent = os.getppid()

    def run(self) -> None:
        threading.Thread(target=self._read, name="api-worker-read", daemon=True).start()
        self.loop.call_soon(self._watch_parent)
        self.loop.run_forever()

    def _read(self) -> None:
        while (message := read_frame(self.request_fd)) is not None and message[0] != "exit":
            self.loop.call_soon_threadsafe(self._dispatch, message)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _watch_parent(self) -> None:
        if os.getppid() != self.parent:
            self.loop.stop()
        else:
            self.loop.call_later(1.0, self._watch_parent)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        if message[0] == "open":
            self._open(*message[1:])
        elif message[0] == "call":
            self.loop.create_task(self._call(*message[1:]))
        elif message[0] == "probe":
            self.loop.create_task(self._probe(*message[1:]))

    def _open(self, client_id: int, config: Any, role: str, seed: int | None) -> None:
        from trainer.llm.api import ApiClient

        try:
            # The trainer's side owns the cache (and checks it before a call comes here).
            self.clients[client_id] = ApiClient(config.model_copy(update={"cache": False}), role, seed=seed)
        except Exception as e:
            self.broken[client_id] = f"cannot start the {role} client: {type(e).__name__}: {e}"

    async def _call(self, request_id: int, client_id: int, model: str, messages: list, temperature: float,
                    max_tokens: int, first_attempt: int) -> None:  # fmt: skip
        from trainer.llm.stats import ApiStats

        if client_id in self.broken:
            self.out.send(("crash", request_id, client_redact(None, self.broken[client_id])))
            return
        try:
            client = self.clients[client_id]
            client.model = model
            stats = ApiStats(client.role)  # this call's own counts, added to the trainer's ApiStats there
            res = await client._attempts(messages, temperature, max_tokens, None, first_attempt, stats)
            delta = {**stats.state_dict(), "latencies": stats.latencies()}
            self.out.send(("result", request_id, dataclasses.asdict(res), delta))
        except Exception:
            text = "".join(traceback.format_exc(limit=5).splitlines(keepends=True)[-6:])
            self.out.send(("crash", request_id, client_redact(self.clients.get(client_id), text)))

    async def _probe(self, request_id: int, client_id: int) -> None:
        if client_id in self.broken:
            self.out.send(("crash", request_id, client_redact(None, self.broken[client_id])))
            return
        try:
            res = await self.clients[client_id].probe()
            self.out.send(("result", request_id, dataclasses.asdict(res), None))
        except Exception:
            text = "".join(traceback.format_exc(limit=5).splitlines(keepends=True)[-6:])
            self.out.send(("crash", request_id, client_redact(self.clients.get(client_id), text)))


def client_redact(client: Any, text: str) -> str:
    from trainer.llm.types import redact

    return client._redact(text) if client is not None else redact(text)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import trainer.llm.api  # noqa: F401  (litellm's seconds of import, before the first call waits on it)

    Worker(int(argv[0]), int(argv[1])).run()
    sys.stdout.flush()
    sys.stderr.flush()
    # The tasks still running belong to a trainer that is gone or closing; tearing down litellm's modules
    # takes a second and helps nobody.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
