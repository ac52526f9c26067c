"""``LocalClient``: a Hugging Face causal LM run in-process behind the same interface as ``ApiClient``.

With ``backend: local`` a run needs no API at all (the quickstart's user simulator). Calls from
concurrent episodes are micro-batched: a worker task on the event loop takes every request waiting
in the queue (up to ``max_batch``, grouped by temperature and length limit) and runs one left-padded
``generate`` for them in a dedicated worker thread, so the event loop never blocks on torch and the
other episodes' API calls keep flowing meanwhile.

Entries of the config's ``extra_body`` are passed to ``apply_chat_template`` as keyword arguments
(e.g. ``enable_thinking: false`` for a local Qwen3). There is no cost, no cache and no retry of
failures other than parse failures when sampling: a local generation does not fail transiently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainer.config.multiturn import ApiBackendConfig
from trainer.llm.stats import ApiStats
from trainer.llm.types import CallResult, Message, Parser


class LocalClient:
    """An ``LLMClient`` for ``backend: local``; loads the model at construction (in the calling thread)."""

    def __init__(self, cfg: ApiBackendConfig, role: str, device: str | None = None, max_batch: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.backend != "local" or not cfg.path:
            raise ValueError("LocalClient needs backend: local and a path")
        self.cfg = cfg
        self.role = role
        self.endpoint = f"{role} (local model {cfg.path})"
        self.stats = ApiStats(role, self.endpoint, None)
        self.max_batch = max_batch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype).to(self.device).eval()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-generate")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        parse: Parser | None = None,
    ) -> CallResult:
        t0 = time.monotonic()
        temperature = self.cfg.temperature if temperature is None else temperature
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._batch_worker())
        assert self._queue is not None
        self.stats.add("calls")
        res = CallResult(ok=False, endpoint=self.endpoint)
        for attempt in range(self.cfg.retries + 1):
            res.attempts = attempt + 1
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            await self._queue.put((list(messages), temperature, max_tokens, fut))
            try:
                text, pt, ct, seconds = await fut
            except Exception as e:  # a bug or an out-of-memory: not transient, report it
                res.kind, res.error = "other", f"{self.endpoint}: {type(e).__name__}: {e}"
                break
            self.stats.add_latency(seconds)
            self.stats.add("prompt_tokens", pt)
            self.stats.add("completion_tokens", ct)
            res.text, res.prompt_tokens, res.completion_tokens = (
                text,
                res.prompt_tokens + pt,
                res.completion_tokens + ct,
            )
            try:
                res.value = parse(text) if parse else text
            except Exception as e:
                res.kind = "parse"
                res.errors_seen.append(f"parse: {e}; reply was {' '.join(text.split())[:120]!r}")
                if temperature > 0 and attempt < self.cfg.retries:
                    res.retries += 1
                    self.stats.add("retries")
                    continue
                res.error = f"{self.endpoint}: {res.errors_seen[-1]}"
                break
            res.ok, res.kind, res.error = True, None, None
            break
        res.latency_s = time.monotonic() - t0
        if not res.ok:
            self.stats.add("failed")
            self.stats.add_error(res.kind or "other", res.error or "")
        return res

    async def _batch_worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty() and len(items) < self.max_batch:
                items.append(self._queue.get_nowait())
            groups: dict[tuple[float, int], list[Any]] = {}
            for item in items:
                if not item[3].cancelled():
                    groups.setdefault((item[1], item[2]), []).append(item)
            for (temperature, max_tokens), group in groups.items():
                t0 = time.monotonic()
                try:
                    outs = await loop.run_in_executor(
                        self._executor, self._generate, [g[0] for g in group], temperature, max_tokens
                    )
                except Exception as e:
                    for g in group:
                        if not g[3].done():
                            g[3].set_exception(e)
                    continue
                seconds = time.monotonic() - t0
                for g, (text, pt, ct) in zip(group, outs, strict=True):
                    if not g[3].done():
                        g[3].set_result((text, pt, ct, seconds))

    def _generate(
        self, conversations: list[list[Message]], temperature: float, max_tokens: int
    ) -> list[tuple]:
        """Runs in the worker thread: one batched ``generate``; returns (text, prompt_tokens, completion_tokens)."""
        import torch

        kwargs = dict(self.cfg.extra_body)
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True, **kwargs)
            for c in conversations
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
            )
        new = out[:, enc["input_ids"].shape[1] :]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        # Count up to and including the first end-of-sequence token; the rest is padding.
        eos = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        results = []
        for row, plen in zip(new, prompt_lens, strict=True):
            ids = row.tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            results.append((text, int(plen), n))
        return results
