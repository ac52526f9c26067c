"""SGLang rollout engine: an HTTP client of an SGLang 0.5.x server (the pod's sidecar, or a local one).

Written to the 0.5.x native API (SGLang's ``python/sglang/srt/entrypoints/http_server.py``) and
tested against ``trainer.testing.sglang_server``, never against a real SGLang server here. Contract used:

- ``GET /health_generate``: 503 while starting, 200 once a one-token generation works. Polled every 2 s
  up to ``rollout.sglang.startup_timeout_s``.
- ``GET /get_server_info``: server args plus ``version``, whose release (major.minor.patch: images report
  e.g. ``0.5.19.post1``) must be ``SGLANG_VERSION``'s.
- ``POST /generate`` with ``input_ids`` (token-in/token-out: the trainer's masks and the engine's tokens
  agree, nothing is re-tokenised), ``sampling_params`` (``max_new_tokens`` always: the server default is
  128), ``return_logprob``, ``rid`` (one per episode turn), ``lora_path`` (the adapter's name). Answer:
  ``output_ids`` (the stop token included: SGLang trims only the text), ``meta_info`` {``finish_reason``
  {type stop|length|abort}, ``output_token_logprobs`` [[logprob, token_id, text|null], ...],
  ``weight_version``}. Log-probs are asked for only when ``top_p == 1`` and ``top_k == 0``: SGLang reports
  those of the top-p/top-k renormalised distribution, which the trainer does not score (so
  ``rollout/logprob_diff`` would be biased). A reset connection or a timeout is retried
  (``GENERATE_ATTEMPTS``, same ``rid``; a timed-out request is aborted first).
- Weights: ``/update_weights_from_disk`` {model_path, weight_version} then ``/get_weight_version``;
  LoRA ``/load_lora_adapter`` {lora_name, lora_path} / ``/unload_lora_adapter`` {lora_name}, each
  answering ``success`` (400 when not) and ``loaded_adapters``. Every call has ``sync_timeout_s``.

Names: ``policy-n{node}-v{step}`` (the node rank in it, so several nodes sharing one ``weights_dir`` or one
server never clobber each other's folders or adapters); each attempt saves to a fresh folder
``<name>.a{attempt}`` (a timed-out reload may still be reading the previous one), and a retry first asks
the server whether the earlier attempt landed after all (``/get_weight_version``; for LoRA a one-token
``/generate`` naming the adapter) before posting again.

Concurrency: ``agenerate`` is awaited by the ``GenerationBatcher`` on the run's event loop, one request
per episode turn, at most ``max_inflight`` at once (a semaphore): the server batches what is in flight.
``generate`` (evaluation outside episodes) runs the same requests on a private event loop.

Weight hand-over (``sync_weights``) runs on one process per node (local rank 0; the node's sidecar is
reached at the same URL by all its ranks); the others wait in ``any_rank``, which doubles as the barrier
and tells every rank when the hand-over failed, so all stop together instead of sampling stale weights.
Every rank reaches that barrier whatever happens (try/finally), and ``start``'s readiness and version
checks pass their outcome through it too: a failure on one node never leaves the others waiting.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from trainer.engines.base import Completion, SamplingParams
from trainer.errors import EXIT_FAILED, UserError

# The chart's sidecar image (cluster.sglang_image) and the `sglang` extra; the API changes between releases.
SGLANG_VERSION = "0.5.19"
DEFAULT_URL = "http://127.0.0.1:30000"
POLL_S = 2.0  # readiness poll period, as RL frameworks poll /health_generate
GENERATE_ATTEMPTS = 3  # a /generate whose connection was reset or timed out is sent again (same rid)


class SGLangError(UserError):
    """The server failed at run time (a hand-over after its retries, an aborted request): the run stops."""

    exit_code = EXIT_FAILED


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("USERLOOP_SGLANG_URL") or DEFAULT_URL).rstrip("/")


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


class SGLangEngine:
    """``RolloutEngine`` over HTTP. ``model`` is the trainer's policy (saved at every hand-over)."""

    def __init__(
        self,
        cfg,
        model,
        tokenizer,
        stop_ids: list[int],
        any_rank: Callable[[bool], bool] | None = None,
        hands_over: bool = True,
        tag: str = "r0",
        node: int | None = None,
    ):
        """``any_rank(flag)`` is True on every process when any passes True (a collective: the barrier);
        ``hands_over``: this process saves and loads the weights (local rank 0 of its node); ``node``: the
        node rank in folder and adapter names (default ``node_rank()``)."""
        sg = cfg.rollout.sglang
        self.url = resolve_url(sg.url)
        self.cfg = sg
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.lora = sg.sync == "lora"
        self.weights_dir = resolve_weights_dir(sg.weights_dir, cfg.output_dir)
        self.any_rank = any_rank or (lambda flag: flag)
        self.hands_over = hands_over
        self.node = node_rank() if node is None else node
        self.prefix = f"policy-n{self.node}-v"  # this node's folders and adapters: <prefix><step>[.a<n>]
        self.lora_name: str | None = None  # the adapter requests are routed to
        self.weight_version: str | None = None  # what /generate must report after a disk sync
        self.sync_s = 0.0  # time of the last hand-over (time/weight_sync_s)
        self.synced_step: int | None = None  # the step whose weights the server holds
        # One id per request (= per episode turn); the random part keeps a restarted trainer's ids new.
        run = os.urandom(3).hex()
        self._rids = (f"{tag}-{run}-{i}" for i in itertools.count())
        self._http = httpx.Client(base_url=self.url, timeout=sg.timeout_s)
        # aiohttp, not httpx, for the many concurrent requests: httpcore's pool scans every connection per
        # request (quadratic; 256 requests of one token took 6 s of client CPU against 0.1 s of model time).
        self._aclients: dict[asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, asyncio.Semaphore]] = {}

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
            raise SGLangError(
                f"rollout.sglang.url {self.url}",
                "the SGLang server failed its start-up checks on another process (see that process's error); "
                "stopping with it",
            )
        self.sync_weights(step)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        last = "no answer yet"
        while True:
            try:
                r = self._http.get("/health_generate", timeout=min(self.cfg.timeout_s, 30.0))
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + POLL_S > deadline:
                raise UserError(
                    f"rollout.sglang.url {self.url}",
                    f"the SGLang server did not become ready within rollout.sglang.startup_timeout_s="
                    f"{self.cfg.startup_timeout_s:g}s (/health_generate: {last})",
                    hint="check the sidecar's log (`kubectl logs <pod> -c sglang`, or the child's log with "
                    "rollout.sglang.launch) for a model-load or CUDA out-of-memory error, and that the URL and "
                    "port match cluster.sglang.port; raise startup_timeout_s for large models",
                )
            time.sleep(POLL_S)

    def check_version(self) -> None:
        info = self._json(self._http.get("/get_server_info"), "/get_server_info")
        version = str(info.get("version", "unknown"))
        if release(version) != release(SGLANG_VERSION):  # post releases (0.5.19.post1) share the API
            raise UserError(
                f"rollout.sglang.url {self.url}",
                f"the server runs SGLang {version}; this client was written for {SGLANG_VERSION} (its HTTP API "
                "changes between releases)",
                hint=f"run the pinned image (cluster.sglang_image) or `pip install userloop[sglang]` "
                f"(sglang=={SGLANG_VERSION})",
            )

    # ------------------------------------------------------------------ generation

    def _payload(self, ids: list[int], params: SamplingParams) -> dict[str, Any]:
        sampling = {
            "max_new_tokens": params.max_new_tokens,  # always: the server's default is 128
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,  # SGLang's "disabled" is -1, not 0
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
        }
        # SGLang's log-probs are those of the top-p/top-k renormalised distribution; the trainer scores the
        # temperature-scaled one only, so they are compared (rollout/logprob_diff) only when the two agree.
        unbiased = params.top_p >= 1.0 and not params.top_k
        body: dict[str, Any] = {"input_ids": ids, "sampling_params": sampling, "return_logprob": unbiased,
                                "rid": next(self._rids)}  # fmt: skip
        if self.lora_name is not None:
            body["lora_path"] = self.lora_name
        return body

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if loop not in self._aclients:
            client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.max_inflight),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            )
            self._aclients[loop] = (client, asyncio.Semaphore(self.cfg.max_inflight))
        return self._aclients[loop]

    async def agenerate(self, ids: list[int], params: SamplingParams) -> Completion:
        """One sample for ``ids``; many of these run concurrently on one event loop."""
        client, slots = self._client()
        body = self._payload(ids, params)
        async with slots:
            for attempt in range(1, GENERATE_ATTEMPTS + 1):
                try:
                    async with client.post(self.url + "/generate", json=body) as r:
                        status, text = r.status, await r.text()
                    break
                except (
                    aiohttp.ClientConnectionError,
                    asyncio.TimeoutError,
                ) as e:  # reset, refused, timed out
                    if attempt == GENERATE_ATTEMPTS:
                        raise SGLangError(f"rollout.sglang.url {self.url}", f"/generate failed {attempt} times "
                                          f"(rid {body['rid']}): {type(e).__name__}: {e}",
                                          hint="check the sidecar's log; raise rollout.sglang.timeout_s for long completions") from e  # fmt: skip
                    if isinstance(e, asyncio.TimeoutError):  # the server may still run it: free the rid first
                        await self._abort(client, body["rid"])
                    await asyncio.sleep(min(0.5 * 2.0 ** (attempt - 1), 4.0))
                except aiohttp.ClientError as e:
                    raise SGLangError(f"rollout.sglang.url {self.url}", f"/generate failed: {type(e).__name__}: {e}",
                                      hint="check the sidecar's log") from e  # fmt: skip
        return self._completion(ids, self._parse(status, text, "/generate"), params)

    async def _abort(self, client: aiohttp.ClientSession, rid: str) -> None:
        try:
            async with client.post(self.url + "/abort_request", json={"rid": rid},
                                   timeout=aiohttp.ClientTimeout(total=10)) as r:  # fmt: skip
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # best effort: the retry is sent anyway

    def _completion(self, prompt: list[int], out: dict[str, Any], params: SamplingParams) -> Completion:
        meta = out["meta_info"]
        reason = (meta.get("finish_reason") or {}).get("type")
        if reason == "abort":
            raise SGLangError(f"rollout.sglang.url {self.url}", f"the server aborted request {meta.get('id')}: "
                              f"{meta['finish_reason'].get('message', '')}")  # fmt: skip
        if self.weight_version is not None and meta.get("weight_version") != self.weight_version:
            raise SGLangError(f"rollout.sglang.url {self.url}", f"/generate answered with weight_version "
                              f"{meta.get('weight_version')!r}, expected {self.weight_version!r}: stale weights")  # fmt: skip
        ids = list(out["output_ids"])
        logprobs: list[float] | None = None
        if params.top_p >= 1.0 and not params.top_k:  # asked for: see _payload
            triples = meta.get("output_token_logprobs") or []
            if [t[1] for t in triples] != ids:
                raise SGLangError(
                    f"rollout.sglang.url {self.url}", "output_token_logprobs do not match output_ids"
                )
            logprobs = [float(t[0]) for t in triples]
        # Same convention as HFEngine: the completion ends with its stop token when there is one. SGLang checks
        # max_new_tokens before the stop ids, so a stop token as the very last allowed token reports "length".
        stop = set(self.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stop), None)
        finished = reason == "stop" or end is not None
        if end is not None:
            ids = ids[: end + 1]
            logprobs = None if logprobs is None else logprobs[: end + 1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(
            prompt_ids=prompt, completion_ids=ids, text=text, finished=finished, logprobs=logprobs
        )

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
        entry = self._aclients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()

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
            if self.hands_over:
                error = self._hand_over_with_retries(step)
            ok = error is None
        finally:
            # The barrier: no rank samples before every node's server has the weights, and all stop together.
            failed = self.any_rank(not ok)
        if failed:
            what = f"{type(error).__name__}: {error}" if error else "failed on another node"
            raise SGLangError(
                f"rollout.sglang.url {self.url}",
                f"handing the step-{step} weights to the server failed after {self.cfg.sync_retries} attempt(s) "
                f"({self.cfg.sync}): {what}; stopping rather than sampling from stale weights",
                hint="check the sidecar's log and free space in rollout.sglang.weights_dir; raise "
                "rollout.sglang.sync_timeout_s for slow reloads; resume from the last checkpoint once fixed",
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
            except (httpx.HTTPError, SGLangError, OSError) as e:
                error = e
                if attempt < self.cfg.sync_retries:
                    time.sleep(min(0.5 * 2.0 ** (attempt - 1), 8.0))  # a busy server: back off
        return error

    def _hand_over(self, step: int, attempt: int, previous: str | None) -> None:
        from trainer.model import unwrap

        name = f"{self.prefix}{step}"
        version = f"v{step}"
        # A retry after a timeout: the earlier attempt may have landed after all; never send it twice.
        path: Path | None = None
        if attempt > 1 and (self._adapter_loaded(name) if self.lora else self._weight_version() == version):
            loaded = None
        else:
            # A fresh folder per attempt: a timed-out reload may still be reading the previous attempt's.
            path = self.weights_dir / f"{name}.a{attempt}"
            if path.exists():  # left by a run that crashed mid-save: never load a half-written directory
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            unwrap(self.model).save_pretrained(path, safe_serialization=True)
            if self.lora:
                if attempt == 1:  # a sidecar that outlived a trainer restart may hold this name already
                    self._post("/unload_lora_adapter", {"lora_name": name})
                loaded = self._post_ok("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}).get(
                    "loaded_adapters"
                )
            else:
                self._post_ok("/update_weights_from_disk", {"model_path": str(path), "weight_version": version,
                                                             "flush_cache": True, "abort_all_requests": False})  # fmt: skip
        if self.lora:
            self.lora_name = name
            # Unload this node's older adapters: the previous step's and any a restarted trainer left behind.
            names = set(loaded) if isinstance(loaded, dict | list) else set()
            stale = {n for n in names if isinstance(n, str) and n.startswith(self.prefix)}
            stale |= {previous} if previous else set()
            for old in sorted(stale - {name}):
                self._post("/unload_lora_adapter", {"lora_name": old})
        else:
            reported = self._weight_version()
            if reported != version:
                raise SGLangError(f"rollout.sglang.url {self.url}", f"after /update_weights_from_disk the server "
                                  f"reports weight_version {reported!r}, expected {version!r}")  # fmt: skip
        # The server holds this step's weights: free this node's older copies (other nodes' are theirs). A
        # disk reload is done with its folder; a LoRA step keeps its folders (which attempt loaded is unknown).
        for old in self.weights_dir.glob(f"{self.prefix}*"):
            if old.name.split(".")[0] != name or (not self.lora and path is not None and old != path):
                shutil.rmtree(old, ignore_errors=True)

    def _weight_version(self) -> Any:
        out = self._json(self._http.get("/get_weight_version", timeout=self.cfg.sync_timeout_s),
                         "/get_weight_version")  # fmt: skip
        return out.get("weight_version")

    def _adapter_loaded(self, name: str) -> bool:
        """Whether the server routes requests to adapter ``name`` (a one-token ``/generate`` naming it)."""
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "lora_path": name,
                "rid": next(self._rids)}  # fmt: skip
        return self._http.post("/generate", json=body, timeout=self.cfg.sync_timeout_s).status_code == 200

    def _post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        return self._http.post(route, json=body, timeout=self.cfg.sync_timeout_s)

    def _post_ok(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        out = self._json(self._post(route, body), route)
        if not out.get("success", False):
            raise SGLangError(
                f"rollout.sglang.url {self.url}", f"{route} failed: {out.get('message') or out}"
            )
        return out

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
            message = (
                out.get("error_message")
                or out.get("message")
                or (out.get("error") or {}).get("message")
                or out
            )
            raise SGLangError(f"rollout.sglang.url {self.url}", f"{route} answered HTTP {status}: {message}")
        return out
