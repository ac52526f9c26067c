"""A test double of the SGLang 0.5.x HTTP server, driven by a local (tiny) model in-process.

It follows the contract the client in ``trainer/engines/sglang.py`` was written to (SGLang's
``srt/entrypoints/http_server.py``), with real computation behind every route:

- ``POST /generate``: token-in/token-out sampling from the model (temperature, top_p, top_k, stop ids,
  ``max_new_tokens`` default 128), ``return_logprob`` (``output_token_logprobs`` as [logprob, id, null]
  triples of the distribution sampled from: log-softmax of logits/temperature, renormalised after top-k and
  top-p as SGLang's sampler reports it), ``rid``,
  ``lora_path`` (an unknown name is a 400, as in SGLang). Concurrent requests are batched together.
  As in SGLang, ``output_ids`` keep the stop token (only the text is trimmed) and ``max_new_tokens``
  is checked before the stop ids (a stop token as the last allowed token reports ``length``).
- ``GET /health``, ``/health_generate``: 503 for ``--start-delay`` seconds and while the model loads.
- ``GET /get_server_info`` (with ``version``), ``/get_model_info`` (alias ``/model_info``),
  ``/get_weight_version``.
- ``POST /update_weights_from_disk``: really reloads the weights from ``model_path``; sets ``weight_version``.
- ``POST /load_lora_adapter`` / ``/unload_lora_adapter``: really loads the peft adapter (needs
  ``--enable-lora``); requests naming it use it.
- ``/flush_cache``: 200, or 400 while requests are in flight. ``POST /abort_request {rid}``: recorded.
- Test hooks (not SGLang's): ``POST /_double/fail_updates {"n": k}`` makes the next k weight hand-overs
  fail; ``POST /_double/slow_updates {"n": k, "s": x}`` makes the next k succeed but answer x seconds
  late (a reload whose answer a client may time out on); ``POST /_double/drop_generates {"n": k}`` closes
  the connection of the next k ``/generate`` requests unanswered; ``POST /_double/slow_generates {"n": k,
  "s": x}`` starts the next k x seconds late; ``GET /_double/stats`` counts requests,
  the most ever in flight at once, and lists every ``/generate`` rid received and every aborted rid.

Run ``python -m trainer.testing.sglang_server --model-path DIR --port P [--enable-lora]``, or use
``SGLangDouble`` (a subprocess on 127.0.0.1 and a free port) as a context manager.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trainer.testing.serve import free_port
from trainer.testing.server_process import ServerProcess

VERSION = "0.5.19"


class _State:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ready_at = time.monotonic() + args.start_delay
        self.model = None
        self.tokenizer = None
        self.eos: set[int] = set()
        self.adapters: dict[str, Any] = {}
        self.weight_version = "default"
        self.fail_updates = 0
        self.slow_updates = (0, 0.0)  # (count, seconds)
        self.drop_generates = 0
        self.slow_generates = (0, 0.0)  # (count, seconds)
        self.rids: list[str] = []  # every /generate's rid, dropped ones included
        self.aborted: list[str] = []
        self.updates = 0  # weight hand-overs that succeeded (disk or LoRA)
        self.versions: list[str] = []  # weight_version of every successful disk update, in order
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.batches = 0
        self.pending: list[tuple[dict, asyncio.Future]] = []
        self.wake = asyncio.Event()
        # One worker thread: generation and weight swaps never overlap, as in SGLang's scheduler.
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trainer.model import quiet_libraries

        quiet_libraries()
        torch.manual_seed(self.args.random_seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.args.model_path, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}


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

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200 if ready() else 503)

    async def server_info(_: web.Request) -> web.Response:
        a = state.args
        return web.json_response({"model_path": a.model_path, "enable_lora": a.enable_lora, "port": a.port,
                                  "max_lora_rank": a.max_lora_rank, "weight_version": state.weight_version,
                                  "version": a.version})  # fmt: skip

    async def model_info(_: web.Request) -> web.Response:
        a = state.args
        return web.json_response({"model_path": a.model_path, "tokenizer_path": a.model_path, "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": state.weight_version})  # fmt: skip

    async def weight_version(_: web.Request) -> web.Response:
        return web.json_response({"weight_version": state.weight_version})

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        if not ready():
            return error("The server is not ready", 503)
        if ("text" in body) == ("input_ids" in body):
            return error("Either text or input_ids should be provided.")
        if "input_ids" not in body:
            return error("this double is token-in only: send input_ids")
        lora = body.get("lora_path")
        if lora is not None and lora not in state.adapters:
            return error(f"The following requested LoRA adapters are not loaded: {{{lora!r}}}\n"
                         f"Loaded adapters: {set(state.adapters)}.")  # fmt: skip
        body.setdefault("rid", os.urandom(8).hex())
        state.rids.append(body["rid"])
        if state.drop_generates > 0:  # a reset connection: closed with no answer
            state.drop_generates -= 1
            request.transport.close()
            return web.Response(status=500)  # never delivered
        n, delay = state.slow_generates
        if n > 0:
            state.slow_generates = (n - 1, delay)
            await asyncio.sleep(delay)
        fut = asyncio.get_running_loop().create_future()
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        state.pending.append((body, fut))
        state.wake.set()
        try:
            return web.json_response(await fut)
        finally:
            state.in_flight -= 1

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
                state.batches += 1
                try:
                    results = await loop.run_in_executor(state.pool, _sample, state, [b for b, _ in group])
                except Exception as e:  # a bug in the double: every request of the batch sees it
                    for _, fut in group:
                        fut.set_exception(e)
                    continue
                for (_, fut), res in zip(group, results, strict=True):
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
            import torch
            from transformers import AutoModelForCausalLM

            try:
                new = AutoModelForCausalLM.from_pretrained(body["model_path"], dtype=torch.float32).eval()
            except (OSError, ValueError, KeyError) as e:
                return f"Failed to get weights iterator: {e}"
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

        def load() -> str | None:
            from peft import PeftModel

            if not state.args.enable_lora:
                return "LoRA is not enabled: launch the server with --enable-lora"
            if name in state.adapters:
                return f"LoRA adapter {name} is already loaded"
            try:
                state.adapters[name] = PeftModel.from_pretrained(copy.deepcopy(state.model), path).eval()
            except (OSError, ValueError) as e:
                return f"Failed to load LoRA adapter {name} from {path}: {e}"
            return None

        problem = "injected failure (test hook)" if consume_failure() else None
        if problem is None:
            problem = await asyncio.get_running_loop().run_in_executor(state.pool, load)
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
        state.aborted.append((await request.json()).get("rid"))
        return web.Response(status=200)

    async def slow_updates(request: web.Request) -> web.Response:
        body = await request.json()
        state.slow_updates = (int(body.get("n", 1)), float(body.get("s", 0.0)))
        return web.json_response({"slow_updates": list(state.slow_updates)})

    async def drop_generates(request: web.Request) -> web.Response:
        state.drop_generates = int((await request.json()).get("n", 1))
        return web.json_response({"drop_generates": state.drop_generates})

    async def slow_generates(request: web.Request) -> web.Response:
        body = await request.json()
        state.slow_generates = (int(body.get("n", 1)), float(body.get("s", 0.0)))
        return web.json_response({"slow_generates": list(state.slow_generates)})

    async def fail_updates(request: web.Request) -> web.Response:
        state.fail_updates = int((await request.json()).get("n", 1))
        return web.json_response({"fail_updates": state.fail_updates})

    async def stats(request: web.Request) -> web.Response:
        out = {"requests": state.requests, "max_in_flight": state.max_in_flight, "batches": state.batches,
               "adapters": sorted(state.adapters), "weight_version": state.weight_version,
               "updates": state.updates, "versions": state.versions, "rids": state.rids,
               "aborted": state.aborted}  # fmt: skip
        if request.query.get("reset"):
            state.requests = state.max_in_flight = state.batches = 0
            state.rids, state.aborted = [], []
        return web.json_response(out)

    async def on_startup(app: web.Application) -> None:
        app["scheduler"] = asyncio.create_task(scheduler())
        asyncio.get_running_loop().run_in_executor(state.pool, state.load)

    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(on_startup)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_weight_version", weight_version)
    app.router.add_post("/generate", generate)
    app.router.add_post("/update_weights_from_disk", update_from_disk)
    app.router.add_post("/load_lora_adapter", load_lora)
    app.router.add_post("/unload_lora_adapter", unload_lora)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/_double/fail_updates", fail_updates)
    app.router.add_post("/_double/slow_updates", slow_updates)
    app.router.add_post("/_double/drop_generates", drop_generates)
    app.router.add_post("/_double/slow_generates", slow_generates)
    app.router.add_get("/_double/stats", stats)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ``sglang.launch_server`` flags the launcher and the chart pass (``launcher.values.sglang_args``),
    plus the double's own (``--start-delay``, ``--version``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int, default=None)
    p.add_argument("--lora-target-modules", nargs="*", default=None)
    p.add_argument("--max-loaded-loras", type=int, default=None)
    p.add_argument("--start-delay", type=float, default=0.0, help="answer 503 on /health_generate this long")
    p.add_argument("--version", default=VERSION, help="the version /get_server_info reports")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)

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
    """The double in a subprocess on 127.0.0.1 and a free port; ``with SGLangDouble(model_dir) as s: s.url``."""

    def __init__(self, model_dir: str | Path, *extra: str, enable_lora: bool = False, wait: bool = True):
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--model-path", self.model_dir, "--port", str(self.port), *extra]
        if enable_lora:
            self.args.append("--enable-lora")
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
