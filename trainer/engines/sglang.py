"""SGLang rollout engine: an HTTP client of an SGLang 0.5.x server (the pod's sidecar, or a local one).

Written to the 0.5.x native API (SGLang's ``python/sglang/srt/entrypoints/http_server.py``) and
tested against ``trainer.testing.sglang_server``, never against a real SGLang server here. Contract used:

- ``GET /health_generate``: 503 while starting, 200 once a one-token generation works. Polled every 2 s
  up to ``rollout.sglang.startup_timeout_s``, with a ``waiting for SGLang at <url> (45s of 600s): <last
  answer>`` line every 15 s.
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
  (``GENERATE_ATTEMPTS``), each attempt under a fresh ``rid`` after ``/abort_request`` of the previous one:
  SGLang refuses a ``rid`` it still tracks (400 "Duplicate request ID"), and it tracks a reset request for
  seconds.
- Weights: ``/update_weights_from_disk`` {model_path, weight_version} then ``/model_info``'s
  ``weight_version`` (``/get_weight_version`` answers 404 in 0.5.19);
  LoRA ``/load_lora_adapter`` {lora_name, lora_path} / ``/unload_lora_adapter`` {lora_name}, each
  answering ``success`` (400 when not) and ``loaded_adapters``. Every call has ``sync_timeout_s``.

What every HTTP engine shares (readiness, the barrier, the retry rules, version bookkeeping, in-flight
bounds, folder and adapter names) is ``trainer.engines.remote.RemoteEngine``'s; this module is SGLang's API.
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

# The chart's sidecar image (cluster.sglang_image) and the `sglang` extra; the API changes between releases.
SGLANG_VERSION = "0.5.19"
DEFAULT_URL = "http://127.0.0.1:30000"


class SGLangError(ServerError):
    """The server failed at run time (a hand-over after its retries, an aborted request): the run stops."""


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("USERLOOP_SGLANG_URL") or DEFAULT_URL).rstrip("/")


class SGLangEngine(RemoteEngine):
    """``RolloutEngine`` over SGLang's native HTTP API. ``model`` is the trainer's policy (saved at every hand-over)."""

    SERVER = "SGLang"
    SECTION = "rollout.sglang"
    CONTAINER = "sglang"
    PORT_FIELD = "cluster.sglang.port"
    HEALTH = "/health_generate"
    GENERATE = "/generate"
    RELOAD = "/update_weights_from_disk"
    Error = SGLangError

    def __init__(self, cfg, model, tokenizer, stop_ids: list[int], any_rank=None, hands_over: bool = True,
                 tag: str = "r0", node: int | None = None):  # fmt: skip
        """See ``RemoteEngine``: ``any_rank`` is the barrier, ``hands_over`` marks local rank 0."""
        sg = cfg.rollout.sglang
        super().__init__(
            cfg, sg, model, tokenizer, stop_ids, resolve_url(sg.url), any_rank, hands_over, tag, node
        )

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

    def _payload(self, ids: list[int], params: SamplingParams, rid: str) -> dict[str, Any]:
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
        body: dict[str, Any] = {
            "input_ids": ids,
            "sampling_params": sampling,
            "return_logprob": unbiased,
            "rid": rid,
        }
        if self.lora_name is not None:
            body["lora_path"] = self.lora_name
        return body

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
        return finished_completion(prompt, ids, logprobs, reason == "stop", self.stop_ids, self.tokenizer)

    # ------------------------------------------------------------------ weights

    def _landed(self, name: str, version: str) -> bool:
        return self._adapter_loaded(name) if self.lora else self._weight_version() == version

    def _load_adapter(self, name: str, path: Path, attempt: int) -> Iterable[str] | None:
        if attempt == 1:  # a sidecar that outlived a trainer restart may hold this name already
            self._post("/unload_lora_adapter", {"lora_name": name})
        loaded = self._post_ok("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}).get(
            "loaded_adapters"
        )
        return loaded if isinstance(loaded, dict | list) else None

    def _unload_adapter(self, name: str) -> None:
        self._post("/unload_lora_adapter", {"lora_name": name})

    def _reload(self, path: Path, version: str) -> None:
        self._post_ok("/update_weights_from_disk", {"model_path": str(path), "weight_version": version,
                                                     "flush_cache": True, "abort_all_requests": False})  # fmt: skip

    def _weight_version(self) -> Any:
        # /model_info, not /get_weight_version: SGLang 0.5.19 answers that one 404 (deprecated for this). It is
        # answered from the server's memory, never waiting for the model.
        out = self._json(self._http.get("/model_info", timeout=self.cfg.sync_timeout_s), "/model_info")
        return out.get("weight_version")

    def _adapter_loaded(self, name: str) -> bool:
        """Whether the server routes requests to adapter ``name`` (a one-token ``/generate`` naming it)."""
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "lora_path": name,
                "rid": next(self._rids)}  # fmt: skip
        return self._http.post("/generate", json=body, timeout=self.cfg.sync_timeout_s).status_code == 200

    def _post_ok(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        out = self._json(self._post(route, body), route)
        if not out.get("success", False):
            raise SGLangError(
                f"rollout.sglang.url {self.url}", f"{route} failed: {out.get('message') or out}"
            )
        return out
