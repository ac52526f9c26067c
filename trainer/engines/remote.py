"""What the HTTP rollout engines share: a rollout server (SGLang, vLLM) behind the ``RolloutEngine`` contract.

``RemoteEngine`` is everything that does not depend on the server's API, written once so that the two
engines cannot drift apart in the rules the run's correctness rests on:

- Start: poll the server's readiness route every ``POLL_S`` up to ``startup_timeout_s``, saying so every
  ``REPORT_S`` (one line per node); check its version; hand the current weights over. Every rank passes its
  checks' outcome through ``any_rank`` (the barrier): all fail together, none waits forever.
- Generation: ``agenerate`` is awaited by the ``GenerationBatcher`` on the run's event loop, one request per
  episode turn, at most ``max_inflight`` at once (a semaphore and the connection pool's limit): the server
  batches what is in flight. A reset connection or a timeout is retried (``GENERATE_ATTEMPTS``), each
  attempt under a fresh request id (``<rid>.<attempt>``) after aborting the previous one: the server may
  still track it, and SGLang refuses an id it tracks; any other client error stops the run. ``generate`` (evaluation outside episodes) runs the same requests on a private loop.
  The completion follows ``HFEngine``'s convention: it ends with its stop token when there is one.
- Weight hand-over (``sync_weights``) runs on one process per node (local rank 0; the node's server is
  reached at the same URL by all its ranks); the others wait in ``any_rank``, which doubles as the barrier
  and tells every rank when the hand-over failed, so all stop together instead of sampling stale weights.
  A step already handed over is not sent again. Transport and HTTP errors are retried ``sync_retries``
  times with back-off; each attempt saves to a fresh folder ``<name>.a<attempt>`` (a timed-out reload may
  still be reading the previous one), and a retry first asks the server whether the earlier attempt landed
  after all before posting again. Names are ``policy-n{node}-v{step}``: the node rank keeps nodes that
  share one ``weights_dir`` or one server apart. After a hand-over this node's older folders (and, with
  LoRA, adapters) are deleted.
- Version bookkeeping: ``synced_step`` (what the server holds), ``weight_version`` (``v<step>``, what a
  full-weight server must report), ``lora_name`` (the adapter every request names).

Subclasses (``trainer.engines.sglang``, ``trainer.engines.vllm``) supply the routes and the request and
answer shapes: ``check_version``, ``_payload``, ``_completion``, ``_abort``, and the hand-over's steps
``_landed``, ``_load_adapter``, ``_unload_adapter``, ``_reload``, ``_weight_version``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import httpx

from trainer.engines.base import Completion, SamplingParams
from trainer.errors import EXIT_FAILED, UserError

POLL_S = 2.0  # readiness poll period, as RL frameworks poll their servers
REPORT_S = 15.0  # how often the wait for readiness says so on stdout
GENERATE_ATTEMPTS = 3  # a generation request whose connection was reset or timed out is sent again (new id)


class ServerError(UserError):
    """The rollout server failed at run time (a hand-over after its retries, an aborted request): the run stops."""

    exit_code = EXIT_FAILED


def release(version: str) -> tuple[int, ...] | None:
    """``(major, minor, patch)`` of a version string (``0.5.19.post1`` -> ``(0, 5, 19)``), None if unparsable."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(x) for x in m.groups()) if m else None


def node_rank() -> int:
    """This process's node: torchrun's ``GROUP_RANK``, else ``RANK // LOCAL_WORLD_SIZE``, else 0."""
    env = os.environ
    if env.get("GROUP_RANK", "").isdigit():
        return int(env["GROUP_RANK"])
    if env.get("RANK", "").isdigit() and env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["RANK"]) // max(1, int(env["LOCAL_WORLD_SIZE"]))
    return 0


def resolve_weights_dir(weights_dir: str | None, output_dir: str) -> Path:
    return Path(weights_dir or os.environ.get("USERLOOP_WEIGHTS_DIR") or Path(output_dir) / "engine_weights")


def backoff(attempt: int, cap: float) -> float:
    """Seconds before attempt ``attempt + 1``: 0.5, 1, 2, ... up to ``cap`` (a busy server gets room)."""
    return min(0.5 * 2.0 ** (attempt - 1), cap)


def finished_completion(prompt: list[int], ids: list[int], logprobs: list[float] | None, stopped: bool,
                        stop_ids: list[int], tokenizer) -> Completion:  # fmt: skip
    """``HFEngine``'s convention: the completion ends with its stop token when there is one, nothing after it.

    ``stopped``: the server said it stopped by itself. A stop token found in ``ids`` counts as finished too
    (SGLang checks ``max_new_tokens`` before the stop ids, so a stop token as the very last allowed token
    reports "length")."""
    stop = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stop), None)
    if end is not None:
        ids = ids[: end + 1]
        logprobs = None if logprobs is None else logprobs[: end + 1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Completion(prompt_ids=prompt, completion_ids=ids, text=text, finished=stopped or end is not None,
                      logprobs=logprobs)  # fmt: skip


class _LoopState:
    """One event loop's client: the aiohttp session, the in-flight bound, and the requests in flight."""

    def __init__(self, max_inflight: int, timeout_s: float):
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_inflight),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )
        self.slots = asyncio.Semaphore(max_inflight)
        self.busy = 0  # requests past the semaphore
        self.preflight: asyncio.Future | None = None  # the check that covers this burst of requests (vLLM)


class RemoteEngine(ABC):
    """``RolloutEngine`` over HTTP. ``model`` is the trainer's policy (saved at every hand-over)."""

    SERVER: ClassVar[str]  # "SGLang": in messages
    SECTION: ClassVar[str]  # "rollout.sglang": the config section named in errors
    CONTAINER: ClassVar[str]  # the sidecar's container name (`kubectl logs <pod> -c <container>`)
    PORT_FIELD: ClassVar[str]  # "cluster.sglang.port"
    HEALTH: ClassVar[str]  # the readiness route: 200 once the server can generate
    GENERATE: ClassVar[str]  # the generation route
    RELOAD: ClassVar[str]  # the full-weight reload route, in messages
    Error: ClassVar[type[ServerError]] = ServerError

    def __init__(self, cfg, section, model, tokenizer, stop_ids: list[int], url: str,
                 any_rank: Callable[[bool], bool] | None = None, hands_over: bool = True, tag: str = "r0",
                 node: int | None = None):  # fmt: skip
        """``section``: the engine's config (``cfg.rollout.sglang``, ...); ``any_rank(flag)`` is True on every
        process when any passes True (a collective: the barrier); ``hands_over``: this process saves and loads
        the weights (local rank 0 of its node); ``node``: the node rank in folder and adapter names (default
        ``node_rank()``)."""
        self.url = url
        self.cfg = section
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.lora = section.sync == "lora"
        self.weights_dir = resolve_weights_dir(section.weights_dir, cfg.output_dir)
        self.any_rank = any_rank or (lambda flag: flag)
        self.hands_over = hands_over
        self.node = node_rank() if node is None else node
        self.prefix = f"policy-n{self.node}-v"  # this node's folders and adapters: <prefix><step>[.a<n>]
        self.lora_name: str | None = None  # the adapter requests are routed to
        self.weight_version: str | None = None  # what the server must report after a full-weight sync
        self.sync_s = 0.0  # time of the last hand-over (time/weight_sync_s)
        self.synced_step: int | None = None  # the step whose weights the server holds
        # One id per request (= per episode turn); the random part keeps a restarted trainer's ids new.
        run = os.urandom(3).hex()
        self._rids = (f"{tag}-{run}-{i}" for i in itertools.count())
        self._http = httpx.Client(base_url=self.url, timeout=section.timeout_s)
        # aiohttp, not httpx, for the many concurrent requests: httpcore's pool scans every connection per
        # request (quadratic; 256 requests of one token took 6 s of client CPU against 0.1 s of model time).
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    @property
    def where(self) -> str:
        return f"{self.SECTION}.url {self.url}"

    # ------------------------------------------------------------------ start

    def start(self, step: int) -> None:
        """Wait for the server, check its version, hand the current weights over (a resumed run's too).

        Every rank passes its checks' outcome through ``any_rank``: all fail together, none waits forever."""
        problem: BaseException | None = None
        try:
            self.wait_ready()
            self.check_version()
        except BaseException as e:  # noqa: BLE001 (re-raised below, after the barrier)
            problem = e
        if self.any_rank(problem is not None):
            if problem is not None:
                raise problem
            raise self.Error(self.where, f"the {self.SERVER} server failed its start-up checks on another process "
                             "(see that process's error); stopping with it")  # fmt: skip
        self.sync_weights(step)

    def wait_ready(self, poll_s: float = POLL_S, report_s: float = REPORT_S) -> None:
        """Poll ``HEALTH`` every ``poll_s`` until it answers 200 or ``startup_timeout_s`` passes.

        A model load takes minutes: every ``report_s`` the process that hands the weights over (one per node,
        so one line per server) prints where it waits and what it last saw, so ``kubectl logs`` shows a run
        that waits, not one that hangs."""
        limit = self.cfg.startup_timeout_s
        t0 = time.monotonic()
        deadline, next_report = t0 + limit, t0 + report_s
        last = "no answer yet"
        while True:
            try:
                r = self._http.get(self.HEALTH, timeout=min(self.cfg.timeout_s, 30.0))
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            if self.hands_over and now >= next_report:
                print(
                    f"waiting for {self.SERVER} at {self.url} ({now - t0:.0f}s of {limit:g}s): {last}",
                    flush=True,
                )
                next_report = now + report_s
            if now + poll_s > deadline:
                raise UserError(
                    self.where,
                    f"the {self.SERVER} server did not become ready within {self.SECTION}.startup_timeout_s="
                    f"{limit:g}s ({self.HEALTH}: {last})",
                    hint=f"check the sidecar's log (`kubectl logs <pod> -c {self.CONTAINER}`, or the child's log "
                    f"with {self.SECTION}.launch) for a model-load or CUDA out-of-memory error, and that the URL "
                    f"and port match {self.PORT_FIELD}; raise startup_timeout_s for large models",
                )
            time.sleep(poll_s)

    @abstractmethod
    def check_version(self) -> None: ...

    # ------------------------------------------------------------------ generation

    @abstractmethod
    def _payload(self, ids: list[int], params: SamplingParams, rid: str) -> dict[str, Any]: ...

    @abstractmethod
    def _completion(self, prompt: list[int], out: dict[str, Any], params: SamplingParams) -> Completion: ...

    @abstractmethod
    async def _abort(self, client: aiohttp.ClientSession, rid: str) -> None:
        """Free request ``rid`` on the server after its client timed out (best effort)."""

    def _preflight(self, client: aiohttp.ClientSession) -> Any:
        """A coroutine that must succeed before requests are sent (again) after none was in flight, or before a
        retry; None when the server reports what answered each request itself (SGLang)."""
        return None

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if loop not in self._loops:
            self._loops[loop] = _LoopState(self.cfg.max_inflight, self.cfg.timeout_s)
        return self._loops[loop]

    async def _preflight_once(self, state: _LoopState, retry: bool) -> None:
        # One check per burst (shared by the requests that start together), a fresh one before any retry.
        if retry or state.preflight is None:
            check = self._preflight(state.client)
            if check is None:
                return
            state.preflight = asyncio.ensure_future(check)
        await asyncio.shield(state.preflight)

    async def agenerate(self, ids: list[int], params: SamplingParams) -> Completion:
        """One sample for ``ids``; many of these run concurrently on one event loop."""
        state = self._state()
        rid = next(self._rids)
        async with state.slots:
            state.busy += 1
            try:
                status, text = await self._send(state, ids, params, rid)
            finally:
                state.busy -= 1
                if state.busy == 0:  # the next request after an idle moment is checked again
                    state.preflight = None
        return self._completion(ids, self._parse(status, text, self.GENERATE), params)

    async def _send(self, state: _LoopState, ids: list[int], params: SamplingParams,
                    rid: str) -> tuple[int, str]:  # fmt: skip
        for attempt in range(1, GENERATE_ATTEMPTS + 1):
            # A fresh id per attempt: the server may still track the previous one (SGLang notices a reset
            # connection only seconds later) and refuses an id it tracks (400 "Duplicate request ID").
            sent = rid if attempt == 1 else f"{rid}.{attempt}"
            try:
                await self._preflight_once(state, retry=attempt > 1)
                body = self._payload(ids, params, sent)
                async with state.client.post(self.url + self.GENERATE, json=body) as r:
                    return r.status, await r.text()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:  # reset, refused, timed out
                if attempt == GENERATE_ATTEMPTS:
                    raise self.Error(self.where, f"{self.GENERATE} failed {attempt} times (rid {sent}): "
                                     f"{type(e).__name__}: {e}", hint="check the sidecar's log; raise "
                                     f"{self.SECTION}.timeout_s for long completions") from e  # fmt: skip
                # The server may still run it (a timeout) or not have noticed the reset yet: free it.
                await self._abort(state.client, sent)
                await asyncio.sleep(backoff(attempt, 4.0))
            except aiohttp.ClientError as e:
                raise self.Error(self.where, f"{self.GENERATE} failed: {type(e).__name__}: {e}",
                                 hint="check the sidecar's log") from e  # fmt: skip
        raise AssertionError("unreachable")

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """``n`` samples per prompt, all in flight at once (up to ``max_inflight``), on a private event loop."""

        async def run() -> list[Completion]:
            try:
                return list(
                    await asyncio.gather(*(self.agenerate(p, params) for p in prompts for _ in range(n)))
                )
            finally:
                await self.aclose()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            flat = asyncio.run(run())
        else:  # called from async code (a notebook's loop): asyncio.run would refuse, so use a thread of its own
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                flat = pool.submit(asyncio.run, run()).result()
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    async def aclose(self) -> None:
        """Close the client of the running loop (call on that loop before it ends)."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ weights

    def sync_weights(self, step: int) -> None:
        """Hand the policy's current weights to the server as version ``step``; every process calls this.

        A step already handed over is not sent again (evaluation right after a GRPO update). Transport and
        HTTP errors are retried; anything else (a failed save, a malformed answer) is not. Either way every
        rank reaches the ``any_rank`` barrier (try/finally), so all fail together."""
        if step == self.synced_step:
            return
        t0 = time.perf_counter()
        error: BaseException | None = None
        ok = False
        try:
            self._stage(step)  # FSDP: every rank takes part in gathering the full weights
            if self.hands_over:
                error = self._hand_over_with_retries(step)
            ok = error is None
        finally:
            # The barrier: no rank samples before every node's server has the weights, and all stop together.
            failed = self.any_rank(not ok)
        if failed:
            what = f"{type(error).__name__}: {error}" if error else "failed on another node"
            raise self.Error(
                self.where,
                f"handing the step-{step} weights to the server failed after {self.cfg.sync_retries} attempt(s) "
                f"({self.cfg.sync}): {what}; stopping rather than sampling from stale weights",
                hint=f"check the sidecar's log and free space in {self.SECTION}.weights_dir; raise "
                f"{self.SECTION}.sync_timeout_s for slow reloads; resume from the last checkpoint once fixed",
            ) from error
        if self.lora and not self.hands_over:
            self.lora_name = f"{self.prefix}{step}"
        elif not self.lora:
            self.weight_version = f"v{step}"
        self.synced_step = step
        self.sync_s = time.perf_counter() - t0

    def _hand_over_with_retries(self, step: int) -> BaseException | None:
        """None once the server holds version ``step``; the last transport/HTTP error after the retries."""
        previous = self.lora_name  # captured once: a failed attempt never changes what is unloaded after
        error: BaseException | None = None
        for attempt in range(1, self.cfg.sync_retries + 1):
            try:
                self._hand_over(step, attempt, previous)
                return None
            except (httpx.HTTPError, ServerError, OSError) as e:
                error = e
                if attempt < self.cfg.sync_retries:
                    time.sleep(backoff(attempt, 8.0))
        return error

    def _hand_over(self, step: int, attempt: int, previous: str | None) -> None:
        name = f"{self.prefix}{step}"
        version = f"v{step}"
        # A retry after a timeout: the earlier attempt may have landed after all; never send it twice.
        path: Path | None = None
        loaded: Iterable[str] | None = None
        if not (attempt > 1 and self._landed(name, version)):
            # A fresh folder per attempt: a timed-out reload may still be reading the previous attempt's.
            path = self.weights_dir / f"{name}.a{attempt}"
            if path.exists():  # left by a run that crashed mid-save: never load a half-written directory
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._save(path)
            if self.lora:
                loaded = self._load_adapter(name, path, attempt)
            else:
                self._reload(path, version)
        if self.lora:
            self.lora_name = name
            # Unload this node's older adapters: the previous step's and any a restarted trainer left behind.
            stale = {n for n in loaded or () if isinstance(n, str) and n.startswith(self.prefix)}
            stale |= {previous} if previous else set()
            for old in sorted(stale - {name}):
                self._unload_adapter(old)
        else:
            reported = self._weight_version()
            if reported != version:
                raise self.Error(self.where, f"after {self.RELOAD} the server reports weight_version "
                                 f"{reported!r}, expected {version!r}")  # fmt: skip
        # The server holds this step's weights: free this node's older copies (other nodes' are theirs). A
        # full reload is done with its folder; a LoRA step keeps its folders (which attempt loaded is unknown).
        for old in self.weights_dir.glob(f"{self.prefix}*"):
            if old.name.split(".")[0] != name or (not self.lora and path is not None and old != path):
                shutil.rmtree(old, ignore_errors=True)

    def _stage(self, step: int) -> None:
        """A sharded policy (``parallel: fsdp``): gather its full weights once per step, a collective of every
        rank, streamed by tensor into ``<name>.staged`` on the ranks that hand over (``trainer.parallel``), in the
        dtype the trainer computes in. ``_save`` hard-links each attempt's folder to it. Nothing otherwise."""
        from trainer import parallel

        self._staged: Path | None = None
        if not parallel.is_sharded(self.model):
            return
        path = self.weights_dir / f"{self.prefix}{step}.staged" if self.hands_over else None
        if path is not None and path.exists():
            shutil.rmtree(path)
        parallel.save_pretrained(self.model, path, dtype=parallel.compute_dtype(self.model))
        self._staged = path

    def _save(self, path: Path) -> None:
        """Write the policy's weights (the adapter with LoRA) where the server will read them."""
        from trainer.model import unwrap

        if getattr(self, "_staged", None) is not None:  # gathered by _stage: no second copy in /weights
            shutil.copytree(self._staged, path, copy_function=os.link)
            return
        unwrap(self.model).save_pretrained(path, safe_serialization=True)

    @abstractmethod
    def _landed(self, name: str, version: str) -> bool:
        """Whether an earlier attempt's adapter ``name`` (LoRA) or weights ``version`` reached the server."""

    @abstractmethod
    def _load_adapter(self, name: str, path: Path, attempt: int) -> Iterable[str] | None:
        """Load the adapter at ``path`` as ``name``; the names of the adapters the server holds, when known."""

    @abstractmethod
    def _unload_adapter(self, name: str) -> None: ...

    @abstractmethod
    def _reload(self, path: Path, version: str) -> None:
        """Load the full weights at ``path``, labelled ``version``."""

    @abstractmethod
    def _weight_version(self) -> Any: ...

    # ------------------------------------------------------------------ answers

    def _post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        return self._http.post(route, json=body, timeout=self.cfg.sync_timeout_s)

    def _json(self, r: httpx.Response, route: str) -> dict[str, Any]:
        return self._parse(r.status_code, r.text, route)

    def _parse(self, status: int, text: str, route: str) -> dict[str, Any]:
        try:
            out = json.loads(text)
        except ValueError:
            out = {"message": text[:300]}
        if not isinstance(out, dict):  # an answer of another shape than this client was written for
            out = {"message": text[:300]}
        if status != 200:
            error = out.get("error")
            message = (
                out.get("error_message")
                or out.get("message")
                or (error.get("message") if isinstance(error, dict) else error)
                or out.get("detail")
                or out
            )
            raise self.Error(self.where, f"{route} answered HTTP {status}: {message}")
        return out
