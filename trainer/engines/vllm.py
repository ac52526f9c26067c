"""vLLM rollout engine: an HTTP client of vLLM's OpenAI-compatible server (the pod's sidecar, or a local one).

Written to vLLM 0.32's server (``vllm/entrypoints``: ``openai/completion``, ``serve/lora``, ``serve/dev``,
``rl/online``) and tested against the real server (its CPU build, ``tests/trainer/test_vllm_engine.py``).
Everything the HTTP engines share (readiness, the barrier, the retry rules, version bookkeeping, in-flight
bounds, folder and adapter names) is ``trainer.engines.remote.RemoteEngine``'s. Contract used:

- ``GET /health``: 200 while the engine is alive. The server listens only once the model is loaded and
  warmed up, so until then the connection is refused. Polled like SGLang's ``/health_generate``.
- ``GET /version``: ``{"version": "0.32.0"}``; its major.minor must be ``VLLM_VERSION``'s (the dev and RL
  routes below change between minor releases). ``GET /server_info?config_format=json`` (dev mode): the
  server's ``logprobs_mode`` and LoRA settings, checked against the run's needs at start.
- ``POST /v1/completions`` with ``prompt`` as token ids (token-in), ``return_token_ids`` (token-out: the
  choice's ``token_ids``, the stop token included), ``max_tokens``, every sampling parameter explicitly
  (a missing one falls back to the model's ``generation_config``: Qwen3 ships top_k 20, temperature 0.6),
  ``stop_token_ids``, ``request_id``, and ``model`` = the adapter's name with LoRA. Log-probs: ``logprobs: 0``
  (the sampled token's only) with ``return_tokens_as_token_ids`` (``tokens`` are ``token_id:<id>``, checked
  against ``token_ids``). vLLM reports the raw model distribution's log-probs unless the server runs with
  ``--logprobs-mode processed_logprobs`` (after temperature, and top-p/top-k: the renormalised distribution);
  the trainer scores the temperature-scaled one, so log-probs are asked for only when ``top_p == 1`` and
  ``top_k == 0``, and with a raw-mode server only at temperature 1 (or 0), where the two agree.
- Weights (dev mode, ``VLLM_SERVER_DEV_MODE=1``): full weights are ``POST /pause?mode=wait`` (in-flight
  requests finish on the old weights, new ones queue), ``/collective_rpc`` ``reload_weights``
  {weights_path}, ``/update_weight_version`` {new_version: v<step>}, ``/reset_prefix_cache`` (cached prefixes
  hold keys and values of the old weights), ``/resume``; then ``GET /weight_info`` must say ``v<step>``.
  A reload from a path vLLM cannot read kills the server (seen on 0.32): the folder is always a complete
  ``save_pretrained``. LoRA (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``/v1/load_lora_adapter``
  {lora_name, lora_path} under the step's name, ``/v1/unload_lora_adapter`` {lora_name} for the old ones,
  ``GET /v1/models`` for what is loaded; no pause: a new name is a new adapter, no request in flight uses it.
- Stale weights: ``/v1/completions`` does not say which weights answered (SGLang's ``meta_info`` does). With
  LoRA every request names its adapter and the answer's ``model`` must be that name (a restarted server
  knows no adapter: 404). With full weights ``/weight_info`` is read whenever requests start after none was
  in flight, and before every retry (``RemoteEngine._preflight``): a server that restarted (base weights,
  version ``default``) between bursts is caught before it answers; one that dies while requests are in
  flight breaks their connections, and their retries are checked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

from trainer.engines.base import Completion, SamplingParams
from trainer.engines.remote import RemoteEngine, ServerError, finished_completion, release
from trainer.errors import UserError

# The chart's sidecar image (cluster.vllm_image) and constraints-vllm.txt; the dev and RL routes change
# between minor releases.
VLLM_VERSION = "0.32.0"
DEFAULT_URL = "http://127.0.0.1:8000"
# The server settings the chart and `rollout.vllm.launch` give vLLM (its hand-over routes need both).
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


class VLLMError(ServerError):
    """The server failed at run time (a hand-over after its retries, an aborted request): the run stops."""


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("USERLOOP_VLLM_URL") or DEFAULT_URL).rstrip("/")


def write_tied_head(model, path: Path) -> None:
    """Add the output head of a model with tied embeddings (Qwen3-0.6B/1.7B/4B) to its saved folder.

    ``save_pretrained`` stores a tied head once, as the input embedding. vLLM 0.32's in-place reload swaps
    in a new embedding tensor but finds nothing to load into the head (``ParallelLMHead: Failed to load
    weights``) and puts the head's old tensor back: the server then samples with the new body and the old
    head (measured on the tiny Qwen3: rollout/logprob_diff 0.001 at step 1, 0.76 at step 40). With the head
    written under its own name the loader fills it too (Qwen3's ``load_weights`` does not skip ``lm_head.``)."""
    import json

    from safetensors.torch import save_file

    from trainer.model import unwrap

    model = unwrap(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    module = next(n for n, m in model.named_modules() if m is head)
    key, file = f"{module}.weight", "tied_head.safetensors"
    save_file({key: head.weight.detach().contiguous()}, str(path / file))
    index = path / "model.safetensors.index.json"
    if index.exists():  # a sharded save: the loader reads only the files its weight map names
        data = json.loads(index.read_text())
        data.setdefault("weight_map", {})[key] = file
        index.write_text(json.dumps(data, indent=2))


class VLLMEngine(RemoteEngine):
    """``RolloutEngine`` over vLLM's OpenAI-compatible server. ``model`` is the trainer's policy."""

    SERVER = "vLLM"
    SECTION = "rollout.vllm"
    CONTAINER = "vllm"
    PORT_FIELD = "cluster.vllm.port"
    HEALTH = "/health"
    GENERATE = "/v1/completions"
    RELOAD = "/collective_rpc reload_weights"
    Error = VLLMError

    def __init__(self, cfg, model, tokenizer, stop_ids: list[int], any_rank=None, hands_over: bool = True,
                 tag: str = "r0", node: int | None = None):  # fmt: skip
        """See ``RemoteEngine``: ``any_rank`` is the barrier, ``hands_over`` marks local rank 0."""
        vl = cfg.rollout.vllm
        super().__init__(
            cfg, vl, model, tokenizer, stop_ids, resolve_url(vl.url), any_rank, hands_over, tag, node
        )
        self.lora_rank = cfg.model.lora.r
        # Whether the server's log-probs are after temperature (logprobs_mode processed_*); read at start.
        self.scores_temperature = True

    # ------------------------------------------------------------------ start

    def check_version(self) -> None:
        version = str(self._json(self._http.get("/version"), "/version").get("version", "unknown"))
        mine = release(VLLM_VERSION)
        if (release(version) or ())[:2] != (mine or ())[:2]:  # patch releases keep the routes used here
            raise UserError(self.where, f"the server runs vLLM {version}; this client was written for "
                            f"{VLLM_VERSION} (its dev and weight-update routes change between releases)",
                            hint="run the pinned image (cluster.vllm_image), or build .venv-vllm with "
                            "scripts/vllm_venv.sh (constraints-vllm.txt)")  # fmt: skip
        r = self._http.get("/server_info", params={"config_format": "json"})
        if r.status_code == 404:
            raise UserError(self.where, "the server has no /server_info: it runs without VLLM_SERVER_DEV_MODE=1, "
                            "which the weight hand-over (/collective_rpc, /pause, /weight_info) needs",
                            hint="start vLLM with VLLM_SERVER_DEV_MODE=1 and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                            "in its environment (the chart and rollout.vllm.launch set both)")  # fmt: skip
        info = self._json(r, "/server_info")
        config = info.get("vllm_config") or {}
        mode = str((config.get("model_config") or {}).get("logprobs_mode", "raw_logprobs"))
        self.scores_temperature = mode.startswith("processed")
        if self.lora:
            lora = config.get("lora_config")
            runtime = str((info.get("vllm_env") or {}).get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")).lower()
            problem = None
            if not lora:
                problem = "runs without --enable-lora"
            elif int(lora.get("max_lora_rank") or 0) < self.lora_rank:
                problem = (
                    f"reserves LoRA rank {lora.get('max_lora_rank')} (--max-lora-rank), below model.lora.r "
                    f"{self.lora_rank}"
                )
            elif runtime not in ("true", "1"):
                problem = "runs without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (no /v1/load_lora_adapter)"
            if problem:
                raise UserError(self.where, f"rollout.vllm.sync is lora but the server {problem}",
                                hint="start it with the flags the chart gives the sidecar (launcher.values.vllm_args), "
                                "or set rollout.vllm.launch: true")  # fmt: skip

    # ------------------------------------------------------------------ generation

    def _wants_logprobs(self, params: SamplingParams) -> bool:
        """Whether the server's log-probs are of the distribution the trainer scores (see the module doc)."""
        untruncated = params.top_p >= 1.0 and not params.top_k
        return untruncated and (self.scores_temperature or params.temperature in (0.0, 1.0))

    def _payload(self, ids: list[int], params: SamplingParams, rid: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": ids,
            "max_tokens": params.max_new_tokens,
            # All of them: an omitted one takes the model's generation_config default, not the neutral value.
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,  # vLLM's "disabled" is 0
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
            "return_token_ids": True,
            "request_id": rid,
        }
        if self._wants_logprobs(params):
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        if self.lora_name is not None:
            body["model"] = self.lora_name
        return body

    async def _abort(self, client: aiohttp.ClientSession, rid: str) -> None:
        # vLLM already aborts a request whose client hung up; this frees it even if the hang-up was not seen.
        # The engine's id of choice 0 of completion request `rid` is cmpl-<rid>-0.
        try:
            async with client.post(self.url + "/abort_requests", json={"request_ids": [f"cmpl-{rid}-0"]},
                                   timeout=aiohttp.ClientTimeout(total=10)) as r:  # fmt: skip
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # best effort: the retry is sent anyway

    def _preflight(self, client: aiohttp.ClientSession) -> Any:
        if self.lora or self.weight_version is None:
            return None  # LoRA: each answer names its adapter (_completion)
        return self._check_weight_version(client)

    async def _check_weight_version(self, client: aiohttp.ClientSession) -> None:
        async with client.get(self.url + "/weight_info", timeout=aiohttp.ClientTimeout(total=30)) as r:
            status, text = r.status, await r.text()
        reported = self._parse(status, text, "/weight_info").get("weight_version")
        if reported != self.weight_version:
            raise VLLMError(self.where, f"the server reports weight_version {reported!r}, expected "
                            f"{self.weight_version!r}: it restarted or was reloaded by someone else; stopping "
                            "rather than sampling from stale weights",
                            hint="resume from the last checkpoint (its weights are handed over at start)")  # fmt: skip

    def _completion(self, prompt: list[int], out: dict[str, Any], params: SamplingParams) -> Completion:
        choice = (out.get("choices") or [{}])[0]
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise VLLMError(self.where, f"request {out.get('id')} ended with finish_reason {reason!r}")
        if self.lora_name is not None and out.get("model") != self.lora_name:
            raise VLLMError(self.where, f"{self.GENERATE} answered from model {out.get('model')!r}, expected "
                            f"adapter {self.lora_name!r}: stale weights")  # fmt: skip
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            raise VLLMError(self.where, f"{self.GENERATE} answered without token_ids (return_token_ids)")
        logprobs: list[float] | None = None
        if self._wants_logprobs(params):  # asked for: see _payload
            lp = choice.get("logprobs") or {}
            values = lp.get("token_logprobs") or []
            if lp.get("tokens") != [f"token_id:{t}" for t in ids] or any(v is None for v in values):
                raise VLLMError(self.where, "the answer's logprobs.tokens do not match its token_ids")
            logprobs = [float(v) for v in values]
        return finished_completion(
            prompt, list(ids), logprobs, reason == "stop", self.stop_ids, self.tokenizer
        )

    # ------------------------------------------------------------------ weights

    def _adapters(self) -> list[str]:
        out = self._json(self._http.get("/v1/models", timeout=self.cfg.sync_timeout_s), "/v1/models")
        return [m.get("id") for m in out.get("data") or [] if isinstance(m, dict) and m.get("parent")]

    def _landed(self, name: str, version: str) -> bool:
        return name in self._adapters() if self.lora else self._weight_version() == version

    def _load_adapter(self, name: str, path: Path, attempt: int) -> Iterable[str] | None:
        if attempt == 1:  # a sidecar that outlived a trainer restart may hold this name already (404 if not)
            self._unload_adapter(name)
        route = "/v1/load_lora_adapter"
        self._json(self._post(route, {"lora_name": name, "lora_path": str(path)}), route)  # 200: plain text
        return self._adapters()

    def _unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def _save(self, path: Path) -> None:
        super()._save(path)
        if not self.lora:
            write_tied_head(self.model, path)

    def _reload(self, path: Path, version: str) -> None:
        # Paused with mode=wait: requests in flight finish on the weights they started with, new ones queue
        # until /resume; nothing is sampled from half-loaded weights.
        self._call("/pause", params={"mode": "wait", "clear_cache": "true"})
        try:
            self._call("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
            self._call("/update_weight_version", {"new_version": version})
            if self._call("/reset_prefix_cache").get("success") is False:
                raise VLLMError(self.where, "/reset_prefix_cache failed after the reload: cached prefixes of the "
                                "old weights would be reused")  # fmt: skip
        finally:
            self._call("/resume")

    def _call(self, route: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None):
        r = self._http.post(route, json=body, params=params, timeout=self.cfg.sync_timeout_s)
        return self._json(r, route)

    def _weight_version(self) -> Any:
        out = self._json(self._http.get("/weight_info", timeout=self.cfg.sync_timeout_s), "/weight_info")
        return out.get("weight_version")
