"""``ProcessApiClient``: the ``LLMClient`` of ``backend: api``, with litellm in a worker process.

Measured in issue 6 (docs/benchmarks.md, API client): 64 litellm calls in flight on the training
process's event-loop thread slowed a busy training loop by 13 %, all of it the GIL (each call costs
~7 ms of Python: request building, the HTTP client, response parsing). Here that work runs in
``trainer.llm.worker``, one child process per trainer process shared by its roles; the trainer keeps what
is cheap and what needs its objects:

- the response cache (a hit never crosses the pipe) and the caller's ``parse`` (parsers are closures);
  a reply the parser rejects is retried from the next attempt, with the same backoff, when sampling;
- ``stats`` (an ``ApiStats`` read between steps for metrics, budgets and resume); the worker sends each
  call's counts back with its result.

Per call the trainer's side pickles one small tuple each way; a thread of its own blocks on the reply pipe
and hands results to the waiting coroutine's loop. The key is read from its environment variable on both
sides (here only to redact) and never crosses the pipe.

    client = ProcessApiClient(cfg, "judge", cache)    # starts or joins this process's worker
    result = await client.complete(messages, parse=parse_verdict)
    await client.aclose()                              # the last client to close stops the worker
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.llm.cache import ResponseCache
from trainer.llm.calls import CachedCalls
from trainer.llm.limits import backoff_delay
from trainer.llm.types import CallResult, Message, Parser, ProbeResult, read_api_key, redact
from trainer.llm.wire import FrameWriter, read_frame

if TYPE_CHECKING:
    from trainer.config.multiturn import ApiBackendConfig

_REPO = Path(__file__).resolve().parents[2]


class WorkerGone(RuntimeError):
    """The API worker died or was closed: the call becomes an invalid result, never an exception upstream."""


class ApiWorker:
    """One ``python -m trainer.llm.worker`` child and the pipes to it; thread-safe."""

    def __init__(self) -> None:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.environ = dict(os.environ)  # what it inherited: a key variable set later needs another worker
        # The worker must import this checkout's trainer even when the trainer runs from elsewhere (tests).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")  # it runs no tensor code; no thread pool to wake
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainer.llm.worker", str(request_r), str(reply_w)],
                pass_fds=(request_r, reply_w), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # a Ctrl-C or SIGTERM to the trainer's group is the trainer's to handle
            )  # fmt: skip
        finally:
            os.close(request_r)
            os.close(reply_w)
        self._out = FrameWriter(request_w)
        self._reply_fd = reply_r
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = 0
        self._gone: str | None = None
        self.refs = 0
        self._reader = threading.Thread(target=self._read, name="userloop-api-replies", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self._gone is None and self.proc.poll() is None

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def open(self, cfg: ApiBackendConfig, role: str, seed: int | None) -> int:
        client_id = self._next_id()
        # The config object itself (a role's subclass of ApiBackendConfig pickles as itself); it names the key's
        # variable, never the key.
        self._send(("open", client_id, cfg, role, seed))
        return client_id

    async def call(self, client_id: int, model: str, messages: Sequence[Message], temperature: float,
                   max_tokens: int, first_attempt: int) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
        """``(CallResult fields, stats delta)`` of attempts ``first_attempt``.. of one call."""
        return await self._request("call", client_id, model, [dict(m) for m in messages], temperature,
                                   max_tokens, first_attempt)  # fmt: skip

    async def probe(self, client_id: int) -> dict[str, Any]:
        """``ProbeResult`` fields of the client's start-up check of its endpoint (``ApiClient.probe``)."""
        fields, _ = await self._request("probe", client_id)
        return fields

    async def _request(self, kind: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = self._next_id()
        with self._lock:
            if self._gone is not None:
                raise WorkerGone(self._gone)
            self._pending[request_id] = (loop, future)
        try:
            self._send((kind, request_id, *args))
            return await future
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._out.send(message)
        except OSError as e:  # EPIPE: the worker died
            raise WorkerGone(self._gone or f"the API worker process is gone ({e})") from e

    def _read(self) -> None:
        while (message := read_frame(self._reply_fd)) is not None:
            kind, request_id = message[0], message[1]
            with self._lock:
                waiter = self._pending.pop(request_id, None)
            if waiter is None:
                continue  # its caller was cancelled
            loop, future = waiter
            if kind == "result":
                outcome: Any = (message[2], message[3])
            else:
                outcome = WorkerGone(f"the API worker failed: {message[2]}")
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, outcome)
        code = self.proc.wait()
        with self._lock:
            self._gone = self._gone or f"the API worker process exited with code {code}"
            waiters, self._pending = list(self._pending.values()), {}
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, WorkerGone(self._gone))

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, wait for it (killing it after ``timeout``), join the reply reader."""
        with self._lock:
            self._gone = self._gone or "the API worker was closed"
        with contextlib.suppress(OSError):
            self._out.send(("exit",))
        with contextlib.suppress(OSError):
            os.close(self._out.fd)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        with contextlib.suppress(OSError):
            os.close(self._reply_fd)


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# One worker per trainer process, shared by its clients, stopped when the last one closes. Another one only
# when a client's key variable changed since the worker started (the worker reads keys from the environment
# it inherited) or in a forked child.
_shared: list[ApiWorker] = []
_shared_pid = os.getpid()
_shared_lock = threading.Lock()


def acquire_worker(key_env: str | None = None) -> ApiWorker:
    global _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():
            _shared.clear()  # the parent's workers are not this process's children
            _shared_pid = os.getpid()
        _shared[:] = [w for w in _shared if w.alive]
        match = (w for w in _shared if key_env is None or w.environ.get(key_env) == os.environ.get(key_env))
        worker = next(match, None)
        if worker is None:
            worker = ApiWorker()
            _shared.append(worker)
        worker.refs += 1
        return worker


def release_worker(worker: ApiWorker) -> None:
    with _shared_lock:
        worker.refs -= 1
        if worker.refs > 0:
            return
        if worker in _shared:
            _shared.remove(worker)
    worker.close()


class ProcessApiClient(CachedCalls):
    """An ``LLMClient`` for ``backend: api`` whose HTTP calls run in the API worker process."""

    def __init__(
        self,
        cfg: ApiBackendConfig,
        role: str,
        cache: ResponseCache | None = None,
        seed: int | None = None,
    ):
        super().__init__(cfg, role, cache, seed)
        self._key = read_api_key(cfg, role)  # fails here, in the trainer, when the variable is unset
        self._worker: ApiWorker | None = acquire_worker(cfg.api_key_env)
        self._id = self._worker.open(cfg, role, seed)

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    async def probe(self) -> ProbeResult:
        """The start-up check of the endpoint, run in the API worker like every call (``ApiClient.probe``)."""
        try:
            if self._worker is None:
                raise WorkerGone("the client is closed")
            return ProbeResult(**await self._worker.probe(self._id))
        except WorkerGone as e:
            return ProbeResult(False, "the API worker process", "other", None, self._redact(str(e)))

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            # Joining the worker blocks for a moment: not on the loop, whose other clients may still be closing.
            await asyncio.get_running_loop().run_in_executor(None, release_worker, worker)

    async def _attempts(
        self, messages: Sequence[Message], temperature: float, max_tokens: int, parse: Parser | None
    ) -> CallResult:
        """The worker's attempts until a reply arrives; then the parser here, and on a rejected sampled reply
        the worker again from the next attempt (``ApiClient._attempts`` does the same in one process)."""
        res = CallResult(ok=False, endpoint=self.endpoint)
        while True:
            try:
                if self._worker is None:
                    raise WorkerGone("the client is closed")
                fields, delta = await self._worker.call(
                    self._id, self.model, messages, temperature, max_tokens, res.attempts
                )
            except WorkerGone as e:
                res.ok, res.kind = False, "other"
                res.error = f"{self.endpoint}: {self._redact(str(e))}"
                return res
            self.stats.absorb(delta)
            part = CallResult(**fields)
            res.attempts = part.attempts
            res.retries += part.retries
            res.prompt_tokens += part.prompt_tokens
            res.completion_tokens += part.completion_tokens
            res.cost += part.cost
            res.errors_seen += part.errors_seen
            res.ok, res.kind, res.status, res.error = part.ok, part.kind, part.status, part.error
            res.text = part.text
            if not part.ok:
                return res
            if parse is None:
                res.value = res.text
                return res
            try:
                res.value = parse(res.text)
                return res
            except Exception as e:
                shown = " ".join(res.text.split())[:120]
                line = f"parse: {self._redact(f'{e}; reply was {shown!r}')}"
                res.ok, res.kind, res.status, res.value = False, "parse", None, None
                res.errors_seen.append(line)
            # A greedy call would say the same again; a sampled one gets the attempts that are left.
            if temperature <= 0 or res.attempts > self.cfg.retries:
                attempts = res.attempts
                res.error = f"{self.endpoint}: {line} (after {attempts} attempt{'s' * (attempts > 1)})"
                return res
            res.retries += 1
            self.stats.add("retries")
            cfg = self.cfg
            await asyncio.sleep(
                backoff_delay(res.attempts - 1, cfg.backoff_s, cfg.max_backoff_s, None, self._rng)
            )

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])
