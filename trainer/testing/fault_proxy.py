"""A fault-injecting HTTP proxy in front of an OpenAI-compatible server, for tests and benchmarks.

It forwards every request to ``upstream`` and, by plan or by script, answers some of them with a
fault instead:

=============  ==================================================================================
kind           what the client sees
=============  ==================================================================================
rate_limit     HTTP 429 with ``Retry-After: <retry_after_s>`` and an OpenAI-style error body
server_error   HTTP 500 with an OpenAI-style error body
stall          nothing for ``stall_s`` seconds (past the client's timeout), then a 504
malformed      HTTP 200 whose JSON body is cut in half
drop           the connection closed without a response
unauthorized   HTTP 401 with an OpenAI-style "Incorrect API key" body (scripted only: a wrong key)
not_found      HTTP 404 ``{"detail": "Not Found"}`` (scripted only: a route the relay does not serve)
=============  ==================================================================================

``latency_s`` is added to every completion request, faulty or not (the benchmark's injected API
latency); with ``latency_dist="exponential"`` each request draws its own delay with that mean (seeded).
Faults come first from the script (``proxy.script("rate_limit", "server_error")`` applies to the
next two requests, in order), then at random with probability ``rate`` among ``kinds``, from a
seeded generator so runs repeat. A ``GET .../models`` (the run-start probe, ``trainer.llm.probe``)
gets no latency and no random fault, and a scripted one only from its own script
(``proxy.script("unauthorized", route="models")``): a run's probe never eats the faults a test meant
for its calls, nor shifts the seeded draws. The proxy counts requests (``models_requests`` of them
probes) and the most requests ever in flight at once (``max_in_flight``), which is how the tests
prove the client's ``max_concurrency`` is a bound.

It runs on its own event loop in a daemon thread, bound to 127.0.0.1 on a free port::

    with FaultProxy("http://127.0.0.1:8000", FaultPlan(latency_s=0.2)) as proxy:
        client = ... api_base=proxy.url + "/v1" ...
        proxy.stats()["max_in_flight"]
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

FAULT_KINDS = ("rate_limit", "server_error", "stall", "malformed", "drop")  # transient: drawn at random
CLIENT_FAULTS = ("unauthorized", "not_found")  # what retrying does not fix: scripted only
ROUTES = ("completions", "models")

# Headers that describe one hop, not the message; aiohttp sets its own.
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


@dataclass
class FaultPlan:
    """What the proxy does to requests that the script does not cover."""

    rate: float = 0.0  # probability that a request gets a fault
    kinds: tuple[str, ...] = FAULT_KINDS  # faults drawn uniformly when one is due
    latency_s: float = 0.0  # added before every response (the mean, with latency_dist "exponential")
    latency_dist: str = "fixed"  # "exponential": each request draws its delay, a relay's long tail
    retry_after_s: float = 0.2  # value of Retry-After on 429s
    stall_s: float = 30.0  # how long a stalled request hangs before its 504
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS) - set(CLIENT_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS + CLIENT_FAULTS}")
        if self.latency_dist not in ("fixed", "exponential"):
            raise ValueError(f"latency_dist {self.latency_dist!r}: expected fixed or exponential")


@dataclass
class _Stats:
    requests: int = 0
    forwarded: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    with_authorization: int = 0
    models_requests: int = 0  # GET .../models (the run-start probe), counted in requests too
    faults: Counter = field(default_factory=Counter)


class FaultProxy:
    """Forward to ``upstream`` (``http://host:port``, no ``/v1``) and inject faults; see the module doc."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, host: str = "127.0.0.1"):
        self.upstream = upstream.rstrip("/")
        self.host = host
        self._plan = plan or FaultPlan()
        self._rng = random.Random(self._plan.seed)
        self._scripts: dict[str, deque[str]] = {route: deque() for route in ROUTES}
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.port = 0

    # ------------------------------------------------------------------ control (any thread)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)

    def script(self, *kinds: str, route: str = "completions") -> None:
        """Apply these faults to the next requests of ``route``, one each, before the plan's random ones."""
        known = FAULT_KINDS + CLIENT_FAULTS
        unknown = set(kinds) - set(known) - {"pass"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {known} and 'pass'")
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {ROUTES}")
        with self._lock:
            self._scripts[route].extend(kinds)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "forwarded": s.forwarded,
                "in_flight": s.in_flight,
                "max_in_flight": s.max_in_flight,
                "with_authorization": s.with_authorization,
                "models_requests": s.models_requests,
                "faults": dict(s.faults),
            }

    def reset_stats(self) -> None:
        with self._lock:
            in_flight = self._stats.in_flight
            self._stats = _Stats(in_flight=in_flight, max_in_flight=in_flight)
            for script in self._scripts.values():
                script.clear()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ready), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)

        async def setup() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # Cancel a handler when its client goes away, so a stalled request stops counting as in flight.
            self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self._session = ClientSession(timeout=ClientTimeout(total=600))

        self._loop.run_until_complete(setup())
        ready.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ requests

    def _delay(self, plan: FaultPlan) -> float:
        if plan.latency_dist == "fixed" or plan.latency_s <= 0:
            return plan.latency_s
        with self._lock:
            return self._rng.expovariate(1 / plan.latency_s)

    def _next_fault(self, route: str) -> tuple[str | None, FaultPlan]:
        with self._lock:
            plan = self._plan
            script = self._scripts[route]
            if script:
                kind = script.popleft()
                return (None if kind == "pass" else kind), plan
            if route == "completions" and plan.rate > 0 and self._rng.random() < plan.rate:
                return self._rng.choice(plan.kinds), plan
            return None, plan

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            s = self._stats
            s.requests += 1
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            if "authorization" in {k.lower() for k in request.headers}:
                s.with_authorization += 1
            route = (
                "models" if request.method == "GET" and request.path.endswith("/models") else "completions"
            )
            s.models_requests += route == "models"
        try:
            body = await request.read()
            kind, plan = self._next_fault(route)
            delay = self._delay(plan) if route == "completions" else 0.0  # the seeded draws stay the calls'
            if delay > 0:
                await asyncio.sleep(delay)
            if kind is not None:
                with self._lock:
                    self._stats.faults[kind] += 1
                return await self._fault(kind, plan, request)
            return await self._forward(request, body)
        finally:
            with self._lock:
                self._stats.in_flight -= 1

    async def _fault(self, kind: str, plan: FaultPlan, request: web.Request) -> web.StreamResponse:
        if kind == "rate_limit":
            return web.json_response(
                {
                    "error": {
                        "message": "rate limit exceeded (injected)",
                        "type": "rate_limit_error",
                        "code": 429,
                    }
                },
                status=429,
                headers={"Retry-After": f"{plan.retry_after_s:g}"},
            )
        if kind == "server_error":
            return web.json_response(
                {"error": {"message": "internal error (injected)", "type": "server_error", "code": 500}},
                status=500,
            )
        if kind == "unauthorized":
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided (injected)",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        if kind == "not_found":
            return web.json_response({"detail": "Not Found"}, status=404)
        if kind == "stall":
            await asyncio.sleep(plan.stall_s)
            return web.json_response({"error": {"message": "upstream timed out (injected)"}}, status=504)
        if kind == "malformed":
            return web.Response(
                status=200,
                content_type="application/json",
                text='{"id": "x", "object": "chat.completion", "choices": [{',
            )
        # drop: close the socket under the client; aiohttp then has nothing to send.
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.rel_url.path_qs, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            with self._lock:
                self._stats.forwarded += 1
            return web.Response(
                status=upstream.status, body=payload, content_type=upstream.content_type or "application/json"
            )
