"""A test double of the SGLang 0.5.19 HTTP server, driven by a local (tiny) model in-process.

It follows the contract the client in ``trainer/engines/sglang.py`` was written to (SGLang's
``srt/entrypoints/http_server.py``) and the rules of SGLang 0.5.19's own code that the client can break,
with real computation behind every route. A double written by us proves only that we agree with ourselves,
so each rule below names the SGLang code it copies, and ``tests/trainer/test_sglang_contract.py`` checks
the copied constants, the routes and the request bodies against the installed SGLang (scripts/sglang_pure.sh).

- Start (``parse_args`` + ``check_args``, SGLang's ``arg_groups/lora_hook.check_lora_server_args``): with
  ``--enable-lora`` both ``--max-lora-rank`` and ``--lora-target-modules`` (choices: SGLang's supported
  modules, ``all`` alone) are required, and ``--max-loaded-loras`` must be at least ``--max-loras-per-batch``
  (default 8): otherwise the double exits 1 with SGLang's assertion message, as the server does.
- ``POST /generate``: token-in/token-out sampling from the model (temperature, top_p, top_k, stop ids,
  ``max_new_tokens`` default 128), ``return_logprob`` (``output_token_logprobs`` as [logprob, id, null]
  triples of the distribution sampled from: log-softmax of logits/temperature, renormalised after top-k and
  top-p as SGLang's sampler reports it), ``rid``, ``lora_path``. Concurrent requests are batched together.
  As in SGLang, ``output_ids`` keep the stop token (only the text is trimmed) and ``max_new_tokens``
  is checked before the stop ids (a stop token as the last allowed token reports ``length``). The model runs
  in ``--dtype`` (``auto``: the checkpoint's), so ``--dtype bfloat16`` gives the sampler's log-probs the
  rounding a real bf16 server has.
- Request ids (``tokenizer_manager._init_req_state``): a ``rid`` the server still tracks is a 400
  ``Duplicate request ID detected``. A request is tracked from its arrival until it is answered; one whose
  connection was reset stays tracked for ``SGLANG_REQUEST_STATE_WAIT_TIMEOUT`` (4 s: SGLang notices a
  disconnect only when its wait for the scheduler times out) unless ``/abort_request`` frees it first.
- LoRA (``lora_manager.validate_new_adapter``, ``mem_pool.can_support``, ``tokenizer_control_mixin``): an
  adapter whose rank exceeds ``--max-lora-rank`` or whose target modules (normalised: q/k/v_proj ->
  qkv_proj, gate/up_proj -> gate_up_proj) are not all in ``--lora-target-modules`` is refused (400); a name
  already loaded is refused; beyond ``--max-loaded-loras`` the least recently used adapter is unloaded. A
  request naming an adapter that was loaded once but is no longer (unloaded, evicted) loads it again from
  its path, as SGLang's ``lora_ref_cache`` does; a name never loaded is a 400.
- ``GET /health``, ``/health_generate`` (``http_server.health_generate``): 503 for ``--start-delay`` seconds
  and while the model loads; then a one-token generation that waits in line behind whatever the model is
  doing (a weight reload included) and answers 503 after ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s) without
  progress. ``/health`` answers 200 at once when ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false``.
- ``GET /get_server_info`` (alias ``/server_info``, with ``version``), ``/model_info`` (alias
  ``/get_model_info``, with ``weight_version``; answered from memory, never waits for the model).
  ``/get_weight_version`` and ``/weight_version`` answer 404 as in SGLang 0.5.19 (deprecated for
  ``/model_info``).
- ``POST /update_weights_from_disk``: really reloads the weights from ``model_path``; sets ``weight_version``.
  Generation waits while it runs (one worker: SGLang's model-update lock).
- ``POST /load_lora_adapter`` / ``/unload_lora_adapter``: really loads the peft adapter; requests naming it
  use it.
- ``/flush_cache``: 200, or 400 while requests are in flight. ``POST /abort_request {rid}``: recorded, frees
  the rid.
- Test hooks (not SGLang's): ``POST /_double/fail_updates {"n": k}`` makes the next k weight hand-overs
  fail; ``POST /_double/slow_updates {"n": k, "s": x}`` makes the next k succeed but answer x seconds
  late (a reload whose answer a client may time out on); ``POST /_double/slow_reloads {"n": k, "s": x}``
  makes the next k reloads themselves take x seconds more (the model is busy meanwhile, as during a large
  model's reload); ``POST /_double/drop_generates {"n": k}`` closes the connection of the next k
  ``/generate`` requests unanswered; ``POST /_double/slow_generates {"n": k, "s": x}`` starts the next k x
  seconds late; ``GET /_double/stats`` counts requests, the most ever in flight at once, lists every
  ``/generate`` rid received and every aborted rid, and says whether a reload runs. ``--record FILE``
  appends every request (method, route, JSON body) to FILE, one JSON object a line, for checking against
  SGLang's request structs.

Run ``python -m trainer.testing.sglang_server --model-path DIR --port P [--enable-lora ...]``, or use
``SGLangDouble`` (a subprocess on 127.0.0.1 and a free port) as a context manager.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from trainer.testing.serve import free_port
from trainer.testing.server_process import ServerProcess

VERSION = "0.5.19"

# SGLang 0.5.19's values of the rules above (test_sglang_contract.py compares them with the installed SGLang).
# sglang.srt.utils.common.SUPPORTED_LORA_TARGET_MODULES, plus LORA_TARGET_ALL_MODULES:
SUPPORTED_LORA_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "wq_b",
    "wk", "weights_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "embed_tokens",
    "lm_head", "qkvr", "wo_ud", "all",
)  # fmt: skip
MAX_LORAS_PER_BATCH = 8  # ServerArgs.max_loras_per_batch's default
# sglang.srt.lora.utils.get_normalized_target_modules: the fused weights LoRA buffers are kept for.
NORMALIZED_MODULES = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj", "q_a_proj": "fused_qkv_a_proj_with_mqa",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa", "wq_b": "indexer.wq_b", "wk": "indexer.wk",
    "weights_proj": "indexer.weights_proj", "vocab_emb": "embed_tokens", "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens", "output": "lm_head", "unembed_tokens": "lm_head",
}  # fmt: skip
HEALTH_CHECK_TIMEOUT_S = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20))  # http_server.py
HEALTH_GENERATES = os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower() in ("1", "true")
DISCONNECT_NOTICE_S = float(os.environ.get("SGLANG_REQUEST_STATE_WAIT_TIMEOUT", 4))  # tokenizer_manager.py
HEALTH_POLL_S = 0.05  # SGLang polls every 1 s; the double is quicker so that tests stay short


def normalized_modules(modules: list[str] | str) -> set[str]:
    """``get_normalized_target_modules``: the fused names; ``{"all"}`` for the PEFT shorthands."""
    if isinstance(modules, str):
        return {"all"}
    return {NORMALIZED_MODULES.get(m.split(".")[-1], m.split(".")[-1]) for m in modules}


class _State:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ready_at = time.monotonic() + args.start_delay
        self.model = None
        self.tokenizer = None
        self.eos: set[int] = set()
        # Loaded adapters, the least recently used first (evicted first beyond --max-loaded-loras).
        self.adapters: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.lora_paths: dict[str, str] = {}  # every adapter ever loaded: SGLang's lora_ref_cache
        self.tracked: set[str] = set()  # rids the server still tracks (SGLang's rid_to_state)
        self.weight_version = "default"
        self.fail_updates = 0
        self.slow_updates = (0, 0.0)  # (count, seconds)
        self.slow_reloads = (0, 0.0)  # (count, seconds)
        self.reloading = False  # a weight reload is running (the model is busy)
        self.drop_generates = 0
        self.slow_generates = (0, 0.0)  # (count, seconds)
        self.rids: list[str] = []  # every /generate's rid, dropped and refused ones included
        self.aborted: list[str] = []
        self.updates = 0  # weight hand-overs that succeeded (disk or LoRA)
        self.versions: list[str] = []  # weight_version of every successful disk update, in order
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.batches = 0
        self.last_receive = 0.0  # when a batch last finished (health checks count any progress)
        self.pending: list[tuple[dict, asyncio.Future]] = []
        self.wake = asyncio.Event()
        # One worker thread: generation and weight swaps never overlap, as in SGLang's scheduler.
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def torch_dtype(self):
        import torch

        names = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "half": torch.float16}  # fmt: skip
        return names.get(self.args.dtype, "auto")  # auto: the checkpoint's dtype, as SGLang

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trainer.model import quiet_libraries

        quiet_libraries()
        torch.manual_seed(self.args.random_seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.args.model_path, dtype=self.torch_dtype()
        ).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    def load_adapter(self, name: str, path: str) -> str | None:
        """Load adapter ``name`` (in the worker); SGLang's error message, or None."""
        from peft import PeftModel

        a = self.args
        if not a.enable_lora:
            return "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
        if name in self.adapters:
            return f"Failed to load LoRA adapter {name} because it is already loaded"
        try:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
            modules = normalized_modules(config.get("target_modules") or [])
            allowed = normalized_modules(list(a.lora_target_modules))
            if int(config["r"]) > a.max_lora_rank or not (
                "all" in modules or "all" in allowed or modules <= allowed
            ):
                return (f"LoRA adapter {name} with rank {config['r']} is incompatible with the current LoRA memory "
                        "pool configuration. Please ensure that the LoRA adapter's rank is within the configured "
                        "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`.")  # fmt: skip
            self.adapters[name] = PeftModel.from_pretrained(copy.deepcopy(self.model), path).eval()
        except (OSError, ValueError, KeyError) as e:
            return f"Failed to load LoRA adapter {name} from {path}: {e}"
        self.lora_paths[name] = path
        while a.max_loaded_loras is not None and len(self.adapters) > a.max_loaded_loras:
            self.adapters.popitem(last=False)  # SGLang unloads the least recently used adapter
        return None


def _sample(state: _State, batch: list[dict]) -> list[dict]:
    """One batched decode loop for requests that share a model (base or one adapter)."""
    import torch

    model = state.model if batch[0].get("lora_path") is None else state.adapters[batch[0]["lora_path"]]
    pad = state.tokenizer.pad_token_id or 0
    seqs = [list(r["input_ids"]) for r in batch]
    sp = [r.get("sampling_params") or {} for r in batch]
    max_new = [int(p.get("max_new_tokens", 128)) for p in sp]
    stops = [set(p.get("stop_token_ids") or []) | (set() if p.get("ignore_eos") else state.eos) for p in sp]
    out: list[list[int]] = [[] for _ in batch]
    lps: list[list[float]] = [[] for _ in batch]
    reason: list[dict | None] = [None] * len(batch)
    with torch.no_grad():
        while any(r is None for r in reason):
            live = [i for i, r in enumerate(reason) if r is None]
            width = max(len(seqs[i]) for i in live)
            ids = torch.tensor([[pad] * (width - len(seqs[i])) + seqs[i] for i in live])
            attn = torch.tensor([[0] * (width - len(seqs[i])) + [1] * len(seqs[i]) for i in live])
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float()
            for row, i in enumerate(live):
                t = float(sp[i].get("temperature", 1.0))
                scaled = logits[row] / t if t > 1e-5 else logits[row]
                logp = torch.log_softmax(scaled, -1)
                if t <= 1e-5:
                    tok = int(logp.argmax())
                else:
                    probs = logp.exp()
                    k = int(sp[i].get("top_k", -1))
                    if k > 0:
                        probs[probs < probs.topk(min(k, probs.numel())).values[-1]] = 0
                    top_p = float(sp[i].get("top_p", 1.0))
                    if top_p < 1.0:
                        sorted_p, order = probs.sort(descending=True)
                        cut = sorted_p.cumsum(0) - sorted_p > top_p
                        probs[order[cut]] = 0
                    probs = probs / probs.sum()
                    tok = int(torch.multinomial(probs, 1))
                    logp = probs.log()  # SGLang reports the renormalised (top-k/top-p) distribution's
                out[i].append(tok)
                lps[i].append(float(logp[tok]))
                seqs[i].append(tok)
                if len(out[i]) >= max_new[i]:  # SGLang checks the length first
                    reason[i] = {"type": "length", "length": max_new[i]}
                elif tok in stops[i]:
                    reason[i] = {"type": "stop", "matched": tok}
    results = []
    for r, ids_out, lp, why in zip(batch, out, lps, reason, strict=True):
        text_ids = ids_out[:-1] if why and why["type"] == "stop" else ids_out  # SGLang trims the text only
        results.append({
            "text": state.tokenizer.decode(text_ids, skip_special_tokens=True),
            "output_ids": ids_out,
            "meta_info": {
                "id": r["rid"], "finish_reason": why, "prompt_tokens": len(r["input_ids"]),
                "completion_tokens": len(ids_out), "cached_tokens": 0, "weight_version": state.weight_version,
                **({"output_token_logprobs": [[v, t, None] for v, t in zip(lp, ids_out, strict=True)]}
                   if r.get("return_logprob") else {}),
            },
        })  # fmt: skip
    return results


def build_app(state: _State):
    from aiohttp import web

    def error(message: str, status: int = 400) -> web.Response:
        return web.json_response({"error": {"message": message}}, status=status)

    def ready() -> bool:
        return state.model is not None and time.monotonic() >= state.ready_at

    def enqueue(body: dict) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        state.pending.append((body, fut))
        state.wake.set()
        return fut

    async def health(request: web.Request) -> web.Response:
        if not ready():
            return web.Response(status=503)
        if request.path == "/health" and not HEALTH_GENERATES:
            return web.Response(status=200)
        # SGLang's check: a one-token generation; any batch finishing after it was queued proves the model
        # runs. It waits behind a reload like every request does.
        tic = time.monotonic()
        enqueue({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                 "rid": f"HEALTH_CHECK_{uuid.uuid4().hex}", "health": True})  # fmt: skip
        while time.monotonic() < tic + HEALTH_CHECK_TIMEOUT_S:
            await asyncio.sleep(HEALTH_POLL_S)
            if state.last_receive > tic:
                return web.Response(status=200)
        return web.Response(status=503)

    async def server_info(_: web.Request) -> web.Response:
        a = state.args
        return web.json_response({"model_path": a.model_path, "enable_lora": a.enable_lora, "port": a.port,
                                  "max_lora_rank": a.max_lora_rank, "max_loaded_loras": a.max_loaded_loras,
                                  "max_loras_per_batch": a.max_loras_per_batch, "dtype": a.dtype,
                                  "weight_version": state.weight_version, "version": a.version})  # fmt: skip

    async def model_info(_: web.Request) -> web.Response:
        a = state.args
        return web.json_response({"model_path": a.model_path, "tokenizer_path": a.model_path, "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": state.weight_version})  # fmt: skip

    async def weight_version(_: web.Request) -> web.Response:
        return web.json_response({"detail": "Endpoint '/get_weight_version' or '/weight_version' is deprecated. "
                                  "Please use '/model_info' instead."}, status=404)  # fmt: skip

    async def resolve_lora(name: str) -> str | None:
        """SGLang's ``_resolve_lora_path``: None when requests may use adapter ``name``, else the 400's message."""
        if not state.args.enable_lora:
            return (f"LoRA adapter '{name}' was requested, but LoRA is not enabled. Please launch the server with "
                    "--enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint.")  # fmt: skip
        if name in state.adapters:
            state.adapters.move_to_end(name)
            return None
        if name not in state.lora_paths:
            return f"Got LoRA adapter that has never been loaded: {name}\nAll loaded adapters: {list(state.lora_paths)}."
        loop = asyncio.get_running_loop()
        problem = await loop.run_in_executor(state.pool, state.load_adapter, name, state.lora_paths[name])
        if problem and "already loaded" not in problem:
            return f"Failed to implicitly load LoRA adapter {name}: {problem}"
        return None

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        if not ready():
            return error("The server is not ready", 503)
        if ("text" in body) == ("input_ids" in body):
            return error("Either text, input_ids or input_embeds should be provided.")
        if "input_ids" not in body:
            return error("this double is token-in only: send input_ids")
        rid = body.setdefault("rid", uuid.uuid4().hex)
        state.rids.append(rid)
        if rid in state.tracked:
            return error(f"Duplicate request ID detected: {rid}")
        state.tracked.add(rid)
        release = True
        try:
            lora = body.get("lora_path")
            if lora is not None and (problem := await resolve_lora(lora)):
                return error(problem)
            if state.drop_generates > 0:  # a reset connection: closed with no answer
                state.drop_generates -= 1
                # SGLang notices the disconnect only at its next wait timeout: the rid stays tracked until then.
                release = False
                asyncio.get_running_loop().call_later(DISCONNECT_NOTICE_S, state.tracked.discard, rid)
                request.transport.close()
                return web.Response(status=500)  # never delivered
            n, delay = state.slow_generates
            if n > 0:
                state.slow_generates = (n - 1, delay)
                await asyncio.sleep(delay)
            state.requests += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                return web.json_response(await enqueue(body))
            finally:
                state.in_flight -= 1
        finally:
            if release:
                state.tracked.discard(rid)

    async def scheduler() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await state.wake.wait()
            state.wake.clear()
            await asyncio.sleep(0.005)  # let the requests arriving together join one batch
            pending, state.pending = state.pending, []
            groups: dict[Any, list] = {}
            for body, fut in pending:
                groups.setdefault(body.get("lora_path"), []).append((body, fut))
            for group in groups.values():
                state.batches += any(not b.get("health") for b, _ in group)
                try:
                    results = await loop.run_in_executor(state.pool, _sample, state, [b for b, _ in group])
                except Exception as e:  # a bug in the double: every request of the batch sees it
                    for _, fut in group:
                        fut.set_exception(e)
                    continue
                state.last_receive = time.monotonic()
                for (_, fut), res in zip(group, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)

    async def answer_late() -> None:
        n, delay = state.slow_updates
        if n > 0:
            state.slow_updates = (n - 1, delay)
            await asyncio.sleep(delay)

    def consume_failure() -> bool:
        if state.fail_updates > 0:
            state.fail_updates -= 1
            return True
        return False

    async def update_from_disk(request: web.Request) -> web.Response:
        body = await request.json()

        def reload() -> str | None:
            from transformers import AutoModelForCausalLM

            state.reloading = True
            try:
                n, delay = state.slow_reloads
                if n > 0:  # a large model's reload: the worker (and so generation) is busy meanwhile
                    state.slow_reloads = (n - 1, delay)
                    time.sleep(delay)
                new = AutoModelForCausalLM.from_pretrained(
                    body["model_path"], dtype=state.torch_dtype()
                ).eval()
            except (OSError, ValueError, KeyError) as e:
                return f"Failed to get weights iterator: {e}"
            finally:
                state.reloading = False
            if new.config.to_dict().get("model_type") != state.model.config.to_dict().get("model_type"):
                return "architecture mismatch"
            state.model = new
            return None

        if consume_failure():
            problem = "injected failure (test hook)"
        else:
            problem = await asyncio.get_running_loop().run_in_executor(state.pool, reload)
        if problem is None:
            state.updates += 1
            if body.get("weight_version") is not None:
                state.weight_version = body["weight_version"]
                state.versions.append(state.weight_version)
            await answer_late()
        ok = problem is None
        return web.json_response({"success": ok, "message": "Succeeded to update model weights." if ok else problem,
                                  "num_paused_requests": 0}, status=200 if ok else 400)  # fmt: skip

    async def load_lora(request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        problem = "injected failure (test hook)" if consume_failure() else None
        if problem is None:
            problem = await asyncio.get_running_loop().run_in_executor(
                state.pool, state.load_adapter, name, path
            )
        state.updates += problem is None
        if problem is None:
            await answer_late()
        return web.json_response({"success": problem is None, "error_message": problem,
                                  "loaded_adapters": {n: str(n) for n in state.adapters}},
                                 status=200 if problem is None else 400)  # fmt: skip

    async def unload_lora(request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        ok = state.adapters.pop(name, None) is not None
        return web.json_response({"success": ok, "error_message": None if ok else f"LoRA adapter {name} is not loaded",
                                  "loaded_adapters": {n: str(n) for n in state.adapters}}, status=200 if ok else 400)  # fmt: skip

    async def flush_cache(_: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.\n", status=400 if state.in_flight else 200)

    async def abort_request(request: web.Request) -> web.Response:
        rid = (await request.json()).get("rid")
        state.aborted.append(rid)
        state.tracked.discard(rid)  # the scheduler finishes it as aborted: the id is free again
        return web.Response(status=200)

    def hook(name: str, pair: bool):
        async def set_hook(request: web.Request) -> web.Response:
            body = await request.json()
            value = (int(body.get("n", 1)), float(body.get("s", 0.0))) if pair else int(body.get("n", 1))
            setattr(state, name, value)
            return web.json_response({name: list(value) if pair else value})

        return set_hook

    async def stats(request: web.Request) -> web.Response:
        out = {"requests": state.requests, "max_in_flight": state.max_in_flight, "batches": state.batches,
               "adapters": sorted(state.adapters), "weight_version": state.weight_version,
               "updates": state.updates, "versions": state.versions, "rids": state.rids,
               "aborted": state.aborted, "tracked": sorted(state.tracked), "reloading": state.reloading}  # fmt: skip
        if request.query.get("reset"):
            state.requests = state.max_in_flight = state.batches = 0
            state.rids, state.aborted = [], []
        return web.json_response(out)

    @web.middleware
    async def record(request: web.Request, handler):
        if state.args.record and not request.path.startswith("/_double/"):
            body = None
            if request.method == "POST" and request.can_read_body:
                try:
                    body = await request.json()
                except ValueError:  # not JSON: recorded as text (SGLang would answer 422)
                    body = await request.text()
            with open(state.args.record, "a") as f:  # aiohttp caches the body: the handler reads it again
                f.write(json.dumps({"method": request.method, "route": request.path, "body": body}) + "\n")
        return await handler(request)

    async def on_startup(app: web.Application) -> None:
        app["scheduler"] = asyncio.create_task(scheduler())
        asyncio.get_running_loop().run_in_executor(state.pool, state.load)

    app = web.Application(client_max_size=64 * 2**20, middlewares=[record])
    app.on_startup.append(on_startup)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_weight_version", weight_version)
    app.router.add_get("/weight_version", weight_version)
    app.router.add_post("/generate", generate)
    app.router.add_post("/update_weights_from_disk", update_from_disk)
    app.router.add_post("/load_lora_adapter", load_lora)
    app.router.add_post("/unload_lora_adapter", unload_lora)
    app.router.add_route("GET", "/flush_cache", flush_cache)
    app.router.add_route("POST", "/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/_double/fail_updates", hook("fail_updates", pair=False))
    app.router.add_post("/_double/slow_updates", hook("slow_updates", pair=True))
    app.router.add_post("/_double/slow_reloads", hook("slow_reloads", pair=True))
    app.router.add_post("/_double/drop_generates", hook("drop_generates", pair=False))
    app.router.add_post("/_double/slow_generates", hook("slow_generates", pair=True))
    app.router.add_get("/_double/stats", stats)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ``sglang.launch_server`` flags the launcher and the chart pass (``launcher.values.sglang_args``),
    plus the double's own (``--start-delay``, ``--version``, ``--record``). An unknown flag is an error: the
    double learns each flag deliberately."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"]
    )
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int, default=None)
    p.add_argument("--lora-target-modules", nargs="*", default=None, choices=SUPPORTED_LORA_TARGET_MODULES)
    p.add_argument("--max-loaded-loras", type=int, default=None)
    p.add_argument("--max-loras-per-batch", type=int, default=MAX_LORAS_PER_BATCH)
    p.add_argument("--start-delay", type=float, default=0.0, help="answer 503 on /health_generate this long")
    p.add_argument("--version", default=VERSION, help="the version /get_server_info reports")
    p.add_argument("--record", default=None, help="append every request (method, route, body) to this file")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """SGLang's ``check_lora_server_args`` (the parts these flags reach); AssertionError as the server raises."""
    assert a.max_loras_per_batch > 0, "max_loras_per_batch must be positive"
    if not a.enable_lora:
        return
    if a.lora_target_modules and "all" in a.lora_target_modules:
        assert len(a.lora_target_modules) == 1, (
            "If 'all' is specified in --lora-target-modules, it should be the only module specified."
        )
    assert a.max_lora_rank and a.lora_target_modules, (
        "When no initial --lora-paths is provided, you need to specify both --max-lora-rank and "
        "--lora-target-modules for LoRA initialization."
    )
    if a.max_loaded_loras is not None:
        assert a.max_loaded_loras >= a.max_loras_per_batch, (
            "max_loaded_loras should be greater than or equal to max_loras_per_batch. "
            f"max_loaded_loras={a.max_loaded_loras}, max_loras_per_batch={a.max_loras_per_batch}"
        )


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    try:
        check_args(args)
    except AssertionError as e:  # the server refuses to start: exit 1 with SGLang's message
        print(f"AssertionError: {e}", file=sys.stderr, flush=True)
        sys.exit(1)

    async def run() -> None:
        state = _State(args)
        runner = web.AppRunner(build_app(state), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        state.pool.shutdown(wait=False, cancel_futures=True)

    asyncio.run(run())


class SGLangDouble(ServerProcess):
    """The double in a subprocess on 127.0.0.1 and a free port; ``with SGLangDouble(model_dir) as s: s.url``.

    ``enable_lora`` without ``--max-lora-rank``/``--lora-target-modules`` in ``extra`` reserves rank 64 for
    every module (``all``): SGLang refuses ``--enable-lora`` alone."""

    def __init__(self, model_dir: str | Path, *extra: str, enable_lora: bool = False, wait: bool = True):
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--model-path", self.model_dir, "--port", str(self.port), *extra]
        if enable_lora:
            self.args.append("--enable-lora")
            if "--max-lora-rank" not in extra:
                self.args += ["--max-lora-rank", "64"]
            if "--lora-target-modules" not in extra:
                self.args += ["--lora-target-modules", "all"]
        self.wait = wait
        self.log_path = Path(tempfile.mkdtemp(prefix="sglang-double-")) / "server.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> SGLangDouble:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen([sys.executable, "-m", "trainer.testing.sglang_server", *self.args],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        log.close()
        if self.wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the SGLang double exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the SGLang double was not ready after {timeout_s:.0f}s:\n{self.log_tail()}")


if __name__ == "__main__":
    main()
