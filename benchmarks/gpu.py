"""GPU benchmark (issue 6, item 6): userloop against TRL on a Qwen3-0.6B-sized model, bf16, HF engine.

Measured for each command, side by side in one run (userloop, TRL, userloop, TRL, ...):

- generation tokens/s: the completion tokens sampled in a step over the time spent inside ``generate``
  (userloop: ``tokens`` / ``time/engine_busy_s`` of its metrics.jsonl; TRL: ``completions/mean_length`` x
  completions over the time inside ``model.generate``, ``benchmarks.grpo_trl --phases``);
- update-step tokens/s: the positions the update's forward/backward passes see (every row of the padded
  batch, prompt and padding included) over the update time (userloop: ``time/update_s``: forward, backward,
  grad clip, AdamW; TRL: the step span minus the time in ``_generate_and_score_completions``);
- MFU of the update step: model FLOPs of the update (``model_flops``) / update time / the GPU's bf16 dense peak.

Model FLOPs (``model_flops``): forward = 2 x (matmul weights of every layer) x positions + 2 x hidden x vocab x
(LM-head positions) + attention 4 x layers x heads x head_dim x (query-key pairs: causal, t(t+1)/2 per row
of t positions, what a causal kernel computes; PaLM's MFU formula counts the full t^2, which would credit
both commands with more), backward = 2 x forward, so the update = 3 x forward. Embedding lookups, norms, activations,
softmax and the optimizer are not counted (the usual MFU convention). LM-head positions are the completion
tokens the loss scores, for both commands: TRL's fused head and userloop's LM-head pre-hook
(``trainer.logprobs.selected_logits``) project only those. No other forward runs in
either update: one update per batch (userloop's ``updates_per_batch: 1``; TRL's ``num_iterations=1`` with
``steps_per_generation`` = ``gradient_accumulation_steps``), so neither recomputes old log-probs, and no KL
(no reference forward). ``tests/test_gpu_bench.py`` checks ``model_flops`` against torch's
``FlopCounterMode`` (forward + backward of a tiny Qwen3 on the CPU), which is what makes the MFU figure
checked without a GPU.

Shapes: every prompt is exactly ``prompt_tokens`` tokens (one character repeated, one token per character),
and a random model over a 151,936-token vocabulary almost never samples a stop token (~2 / 151,936 per
token), so completions run to ``max_new_tokens``: a step's padded batch is batch x group rows of
prompt_tokens + max_new_tokens positions. userloop logs the positions its update ran over
(``update/positions``); TRL's shapes are traced from its forwards.

The vocabulary: the model has Qwen3-0.6B's 151,936 ids, the tokenizer (``trainer.tiny.build_tokenizer``,
no download) ~160; sampled ids beyond the tokenizer decode to nothing (the fast tokenizer skips unknown ids,
checked), so completions' text is mostly empty and rewards are 0: the update still runs its full
forward/backward over every position (advantages 0), so the timing and FLOPs are those of a real step.

Precision, both commands: float32 master weights, forwards under bf16 autocast (userloop's
``model.dtype: auto`` with full fine-tuning on a GPU; TRL's ``bf16=True`` with ``dtype: float32``); the
checkpoint on disk is bf16.

On the device machine (H200, Python 3.12; no pydantic or TRL there: ``benchmarks/gpu_wheels.sh`` downloads
the missing wheels into ``.whl/`` here, carried with ``carry: [".whl"]``), one command::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTHONUNBUFFERED=1; nvidia-smi -L; python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|accelerate|trl|datasets|pyarrow|fsspec|regex|pydantic) '; python3 -m benchmarks.run --only gpu --only logprobs --write --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log; cp docs/benchmarks.md $OUT/

with ``timeout_s`` 600 (sized to finish in about 6 minutes: model build and save, then 2 rounds x 2 commands of
4 steps; not yet run on a GPU, so the size is an estimate; the ``logprobs`` benchmark beside it, userloop's loss
head against TRL's Triton kernel on the GPU, adds about a minute). A command that fails (TRL on the image's
library versions, say) is recorded in the section with its error and the other one's figures still stand.
Elsewhere:
``python -m benchmarks.gpu [--quick] [--peak-tflops X] [--write]``; an unknown GPU needs ``--peak-tflops``
(or ``USERLOOP_PEAK_TFLOPS`` through ``benchmarks.run``). ``--quick`` runs the same path on the CPU with a
tiny model (MFU n/a): a smoke check, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import (
    DOCS,
    Timed,
    bench_env,
    code_version,
    fmt,
    interleave,
    load_average,
    machine,
    median,
    run_timed,
    utc_now,
    versions,
    write_section,
)

HEADING = "## GPU (H200 class)"
COMMANDS = ("userloop", "trl")
PEAK_ENV = "USERLOOP_PEAK_TFLOPS"

# bf16 dense (no sparsity) tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins: the more specific names first.
PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.4),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.6),
    (("H100",), 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),
)


@dataclass(frozen=True)
class GpuSettings:
    label: str = "Qwen3-0.6B-sized"
    device: str = "cuda"
    # Qwen3-0.6B's dimensions (its config.json; as benchmarks.checkpoint_io)
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    prompt_tokens: int = 16
    batch_size: int = 8  # prompts per optimizer step
    group_size: int = 8  # completions per prompt
    max_new_tokens: int = 256
    grad_accum: int = 2  # micro-batches per step (32 sequences each): bounds the [rows, T, V] logits' memory
    lr: float = 1e-6
    temperature: float = 1.0
    steps: int = 4
    warm_skip: int = 1  # the first step (CUDA/cuBLAS initialisation, allocator growth) is left out
    rounds: int = 2
    train_rows: int = 64
    # userloop's parallel.strategy; --parallel fsdp: FSDP2 over this one GPU, bf16 compute
    parallel: str = "ddp"


FULL = GpuSettings()
QUICK = GpuSettings(label="tiny (quick setting, CPU)", device="cpu", vocab_size=512, hidden_size=64,
                    intermediate_size=128, layers=2, heads=4, kv_heads=2, head_dim=16, prompt_tokens=8, batch_size=2,
                    group_size=2, max_new_tokens=8, grad_accum=1, steps=2, warm_skip=1, rounds=1,
                    train_rows=8)  # fmt: skip


# ----------------------------------------------------------------------------- FLOPs


def _dims(config) -> dict[str, int]:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    return {"hidden": hidden, "intermediate": get("intermediate_size"), "layers": get("num_hidden_layers"),
            "heads": heads, "kv_heads": get("num_key_value_heads") or heads,
            "head_dim": get("head_dim") or hidden // heads, "vocab": get("vocab_size")}  # fmt: skip


def matmul_weights(config) -> tuple[int, int]:
    """(matmul weights of one decoder layer, of the LM head) of a Qwen3/Llama-style model (``config`` a
    transformers config or a dict of its fields). Norms and embeddings are not matmuls."""
    d = _dims(config)
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * d["intermediate"]  # q, k, v, o; gate, up, down
    return layer, h * d["vocab"]


def model_flops(config, seq_lens: list[int], lm_head_positions: int | None = None, causal: bool = True,
                backward: bool = True) -> dict[str, float]:  # fmt: skip
    """Model FLOPs of a forward (and backward) over rows of ``seq_lens`` positions each.

    ``seq_lens``: the positions of each row as the forward sees them (the padded width for a padded batch);
    ``lm_head_positions``: positions the LM head projects (default: all); ``causal``: count the t(t+1)/2
    query-key pairs a causal kernel needs per row (False: all t^2, what an eager attention computes);
    ``backward``: add 2 x the forward. Returns ``forward``, ``total`` and the parts (``layers``, ``lm_head``,
    ``attention``) of the forward.
    """
    d = _dims(config)
    layer, head = matmul_weights(config)
    positions = sum(seq_lens)
    lm = positions if lm_head_positions is None else lm_head_positions
    pairs = sum(t * (t + 1) // 2 if causal else t * t for t in seq_lens)
    parts = {
        "layers": 2.0 * d["layers"] * layer * positions,
        "lm_head": 2.0 * head * lm,
        "attention": 2.0 * 2 * d["layers"] * d["heads"] * d["head_dim"] * pairs,  # q.k^T and p.v
    }
    forward = sum(parts.values())
    return {**parts, "forward": forward, "total": forward * (3 if backward else 1)}


def peak_tflops(device_name: str, override: float | None = None) -> float:
    """The bf16 dense peak of ``device_name``; an unknown GPU needs ``override`` (``--peak-tflops``)."""
    if override:
        return float(override)
    name = device_name.upper()
    for keys, peak in PEAKS:
        if all(k in name for k in keys):
            return peak
    raise SystemExit(f"no bf16 peak known for {device_name!r}: pass --peak-tflops (or {PEAK_ENV})")


# ----------------------------------------------------------------------------- setup


def build_model(out: Path, s: GpuSettings) -> dict:
    """A random-initialised Qwen3 of ``s``'s dimensions (the model's own init), saved with save_pretrained
    (bf16 on a GPU run, float32 on the CPU) next to ``trainer.tiny``'s tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from benchmarks.common import qwen3_config
    from trainer.model import quiet_libraries
    from trainer.tiny import build_tokenizer

    quiet_libraries()
    tok = build_tokenizer()
    config = qwen3_config(s, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(s.device):
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if s.device == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": s.vocab_size,
            "tokenizer_size": len(tok), "saved_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}  # fmt: skip
    del model
    if s.device == "cuda":
        torch.cuda.empty_cache()
    return info


def write_data(path: Path, model_dir: Path, s: GpuSettings) -> None:
    """Rows whose prompt is exactly ``s.prompt_tokens`` tokens: one character repeated (checked)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    chars = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w", encoding="utf-8") as f:
        for i in range(s.train_rows):
            prompt = chars[i % len(chars)] * s.prompt_tokens
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            assert n == s.prompt_tokens, f"{prompt!r} is {n} tokens, not {s.prompt_tokens}"
            f.write(json.dumps({"prompt": prompt, "answer": "z"}) + "\n")


def userloop_config(work: Path, model: Path, data: Path, s: GpuSettings) -> Path:
    """GRPO, HF engine, full fine-tuning, ``dtype: auto`` (bf16 autocast over float32 weights on a GPU)."""
    import yaml

    cfg = {
        "name": "bench-gpu",
        "output_dir": str(work / "userloop"),
        "model": {"path": str(model), "dtype": "auto", "lora": {"enabled": False}},
        "algorithm": {"name": "grpo", "lr": s.lr, "batch_size": s.batch_size, "group_size": s.group_size,
                      "grad_accum": s.grad_accum, "max_steps": s.steps, "epochs": 1000, "clip_range": 0.2,
                      "kl_coef": 0.0, "entropy_coef": 0.0, "updates_per_batch": 1, "seed": 0,
                      "scheduler": {"type": "constant", "warmup_steps": 0}},
        "data": {"train": {"path": str(data)}, "use_chat_template": False},
        "rollout": {"engine": "hf", "max_new_tokens": s.max_new_tokens, "temperature": s.temperature},
        "rewards": [{"type": "accuracy"}],
        "checkpoint": {"save_final": False, "resume": "never"},
        "logging": {"every_steps": 1, "plots": False},
        "parallel": {"strategy": s.parallel},
    }  # fmt: skip
    path = work / "userloop.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- runs


def run_userloop(rnd: int, work: Path, paths: dict[str, Path], s: GpuSettings, threads: int) -> Timed:
    out_dir = work / f"userloop-{rnd}"
    cmd = [sys.executable, "-m", "launcher", "run", str(paths["config"]), "--set", f"output_dir={out_dir}"]
    timed = run_timed(cmd, bench_env(threads))
    rows = [json.loads(line) for line in (out_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    keys = (
        "time/step_s",
        "time/generate_s",
        "time/update_s",
        "time/engine_busy_s",
        "tokens",
        "completion/finished",
        "update/positions",
    )
    timed.extra = {k: [r.get(k, float("nan")) for r in rows] for k in keys}
    shutil.rmtree(out_dir, ignore_errors=True)
    return timed


def run_trl(rnd: int, work: Path, paths: dict[str, Path], s: GpuSettings, threads: int) -> Timed:
    out = work / f"trl-{rnd}.json"
    cmd = [sys.executable, "-m", "benchmarks.grpo_trl", "--model", str(paths["model"]), "--data", str(paths["data"]),
           "--batch", str(s.batch_size), "--group", str(s.group_size), "--max-new", str(s.max_new_tokens),
           "--lr", str(s.lr), "--steps", str(s.steps), "--temperature", str(s.temperature), "--out", str(out),
           "--device", s.device, "--grad-accum", str(s.grad_accum), "--phases"]  # fmt: skip
    if s.device == "cuda":
        cmd.append("--bf16")
    timed = run_timed(cmd, bench_env(threads))
    timed.extra = json.loads(out.read_text())
    return timed


def _steps_userloop(t: Timed, s: GpuSettings, config: dict) -> list[dict]:
    e = t.extra
    rows = s.batch_size * s.group_size
    steps = []
    for i in range(s.warm_skip, len(e["time/step_s"])):
        tokens = e["tokens"][i]
        positions = e["update/positions"][i]
        exact = positions == positions  # logged (not NaN): the padded batch's real width
        # The bench config pins updates_per_batch: 1, so the positions are one pass over rows x width.
        width = round(positions / rows) if exact else s.prompt_tokens + s.max_new_tokens
        flops = model_flops(config, [width] * rows, lm_head_positions=round(tokens))["total"]
        steps.append({"step_s": e["time/step_s"][i], "generate_s": e["time/engine_busy_s"][i],
                      "gen_tokens": tokens, "update_s": e["time/update_s"][i], "update_positions": rows * width,
                      "flops": flops, "shape_known": exact})  # fmt: skip
    return steps


def _steps_trl(t: Timed, s: GpuSettings, config: dict) -> list[dict]:
    e = t.extra
    steps = []
    for i in range(s.warm_skip, len(e["step_s"])):
        fwd = e["forwards"][i]
        flops = sum(
            model_flops(config, [f["width"]] * f["rows"], lm_head_positions=f["scored"])["total"] for f in fwd
        )
        steps.append({"step_s": e["step_s"][i], "generate_s": e["generate_s"][i],
                      "gen_tokens": e["tokens"][i] if i < len(e["tokens"]) else float("nan"),
                      "update_s": e["step_s"][i] - e["gen_score_s"][i],
                      "update_positions": sum(f["rows"] * f["width"] for f in fwd), "flops": flops,
                      "shape_known": bool(fwd), "widths": sorted({f["width"] for f in fwd})})  # fmt: skip
    return steps


def summarize(runs: list[Timed], steps_of, s: GpuSettings, config: dict, peak: float | None) -> dict:
    per_run = []
    for t in runs:
        steps = [x for x in steps_of(t, s, config) if x["shape_known"]]
        if not steps:
            continue
        per_run.append({
            "step_s": median([x["step_s"] for x in steps]),
            "generate_s": median([x["generate_s"] for x in steps]),
            "update_s": median([x["update_s"] for x in steps]),
            "gen_tokens_per_s": median([x["gen_tokens"] / x["generate_s"] for x in steps]),
            "update_tokens_per_s": median([x["update_positions"] / x["update_s"] for x in steps]),
            "update_tflops": median([x["flops"] / x["update_s"] / 1e12 for x in steps]),
            "update_positions": median([x["update_positions"] for x in steps]),
            "steps": len(steps),
        })  # fmt: skip
    out = {k: median([r[k] for r in per_run]) for k in per_run[0]} if per_run else {}
    out["mfu"] = out["update_tflops"] / peak if peak and out else float("nan")
    out["process_s"] = median([t.wall_s for t in runs])
    out["per_run"] = per_run
    out["process_s_all"] = [round(t.wall_s, 1) for t in runs]
    if runs and "no_grad_forwards" in runs[0].extra:
        out["no_grad_forwards"] = runs[0].extra["no_grad_forwards"]
        out["widths"] = sorted({w for t in runs for x in steps_of(t, s, config) for w in x.get("widths", [])})
    return out


def _have_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def bench(s: GpuSettings, threads: int, peak_override: float | None = None, log=print) -> dict:
    import torch

    gpu_name = torch.cuda.get_device_name(0) if s.device == "cuda" else None
    peak = peak_tflops(gpu_name, peak_override) if gpu_name else None
    commands = [c for c in COMMANDS if c != "trl" or _have_trl()]
    work = Path(tempfile.mkdtemp(prefix="userloop-bench-gpu-"))
    try:
        paths = {"model": work / "model", "data": work / "train.jsonl"}
        info = build_model(paths["model"], s)
        write_data(paths["data"], paths["model"], s)
        paths["config"] = userloop_config(work, paths["model"], paths["data"], s)
        log(f"gpu: model {info['parameters']:,} parameters saved ({info['saved_dtype']})")
        config = json.loads((paths["model"] / "config.json").read_text())
        runners = {"userloop": run_userloop, "trl": run_trl}

        failed: dict[str, str] = {}

        def make(command: str):
            def go(rnd: int) -> Timed | None:
                if command in failed:  # failed once: not retried (its error goes into the section)
                    return None
                try:
                    t = runners[command](rnd, work, paths, s, threads)
                except Exception as e:  # recorded, not fatal: the other command's figures still count
                    failed[command] = f"{type(e).__name__}: {str(e)[-1500:]}"
                    log(f"gpu {command} round {rnd}: FAILED {failed[command]}")
                    return None
                log(f"gpu {command} round {rnd}: process {t.wall_s:.1f} s")
                return t

            return go

        runs = interleave({c: make(c) for c in commands}, s.rounds)
        steps_of = {"userloop": _steps_userloop, "trl": _steps_trl}
        results = {}
        for c in commands:
            done = [t for t in runs[c] if t is not None]
            results[c] = summarize(done, steps_of[c], s, config, peak) if done else {}
            if c in failed:
                results[c]["error"] = failed[c]
        one_step = model_flops(config, [s.prompt_tokens + s.max_new_tokens] * (s.batch_size * s.group_size),
                               lm_head_positions=s.batch_size * s.group_size * s.max_new_tokens)  # fmt: skip
        return {"settings": asdict(s), "threads": threads, "model": info, "gpu": gpu_name, "peak_tflops": peak,
                "results": results, "flops_per_step": one_step, "machine": machine(), "load": load_average(),
                "when": utc_now(), "code": code_version(),
                "versions": versions("torch", "transformers", "accelerate", "trl", "datasets", "pydantic")}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- the doc's section


def _describe(s: GpuSettings) -> str:
    rows = s.batch_size * s.group_size
    return (f"{s.label} Qwen3 (`Qwen3Config`: vocab {s.vocab_size:,}, hidden {s.hidden_size}, intermediate "
            f"{s.intermediate_size}, {s.layers} layers, {s.heads}/{s.kv_heads} heads, head_dim {s.head_dim}, tied "
            f"embeddings), random init (the model's own), tokenizer `trainer.tiny.build_tokenizer`; GRPO, HF "
            f"engine, full fine-tuning{', FSDP2 (userloop)' if s.parallel == 'fsdp' else ''}, batch "
            f"{s.batch_size} prompts x group {s.group_size} = {rows} completions per "
            f"step, prompts of {s.prompt_tokens} tokens, max_new_tokens {s.max_new_tokens}, temperature "
            f"{s.temperature:g}, {s.grad_accum} micro-batch(es) per step, lr {s.lr:g} constant, AdamW, clip 0.2, "
            f"no KL, one update per batch, no eval or checkpoints; {s.steps} steps per process (the first "
            f"{s.warm_skip} left out), {s.rounds} interleaved round(s) (userloop, TRL, userloop, ...)")  # fmt: skip


def section(res: dict, command_line: str) -> str:
    s = GpuSettings(**res["settings"])
    m = res["model"]
    gpu = res["gpu"]
    where = f"GPU: {gpu} (bf16 dense peak {res['peak_tflops']:g} TFLOP/s)" if gpu else "CPU only: MFU n/a"
    lines = [
        HEADING,
        "",
        f"Measured {res['when']} ({res['code']}) with `{command_line}` (load average at the end {res['load']}).",
        f"Machine: {res['machine']}. {where}. {res['versions']}. `OMP_NUM_THREADS={res['threads']}`.",
        "",
        f"Settings: {_describe(s)}. {m['parameters']:,} parameters; checkpoint saved in {m['saved_dtype']}, "
        + (
            "trained as float32 master weights under bf16 autocast by both commands."
            if gpu
            else "float32 on the CPU."
        )
        + (" A smoke check of the code path, not a measurement." if not gpu else ""),
        "",
        "| command | generation tokens/s | update tokens/s | update TFLOP/s | MFU of the update | step (s) | "
        "generate (s) | update (s) | process (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cmd in COMMANDS:
        r = res["results"].get(cmd)
        if r is None:
            lines.append(
                f"| {cmd} | not run (trl/datasets not installed: `pip install -e '.[bench]'`) | | | | | | | |"
            )
            continue
        if "error" in r and "step_s" not in r:
            err = r["error"].strip().splitlines()[-1].replace("|", "/")[:300]
            lines.append(f"| {cmd} | failed: `{err}` (the run's log has the rest) | | | | | | | |")
            continue
        if "step_s" not in r:
            lines.append(
                f"| {cmd} | no step with a known batch shape | | | | | | | {fmt(r['process_s'], 1)} |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] == r["mfu"] else "n/a"
        lines.append(f"| {cmd} | {fmt(r['gen_tokens_per_s'], 0)} | {fmt(r['update_tokens_per_s'], 0)} | "
                     f"{fmt(r['update_tflops'], 3 if not gpu else 1)} | {mfu} | {fmt(r['step_s'], 3)} | "
                     f"{fmt(r['generate_s'], 3)} | {fmt(r['update_s'], 3)} | {fmt(r['process_s'], 1)} |")  # fmt: skip
    f = res["flops_per_step"]
    lines += [
        "",
        "Target (issue 6): MFU of the update step >= 35 %.",
        "",
        "How: medians over the warm steps of each process, then over processes. *Generation tokens/s*: completion "
        "tokens sampled / time inside `generate` (userloop `tokens` / `time/engine_busy_s`; TRL: its "
        "`completions/mean_length` x completions / the time in `model.generate`, CUDA-synchronised). *Update "
        "tokens/s*: positions of the update's forward/backward (every row of the padded batch: prompt, completion "
        "and padding) / update time (userloop `time/update_s`: forward, backward, clip, AdamW, timed by the trainer "
        "after a CUDA synchronisation; TRL: the synchronised step span minus "
        "`_generate_and_score_completions`). *MFU*: model FLOPs of the update (`benchmarks.gpu.model_flops`: "
        "3 x (2 x matmul weights x positions, LM head at the scored completion tokens only, causal attention "
        "4 x layers x heads x head_dim x t(t+1)/2 per row)) / update time / peak. No old-log-prob or reference forward runs "
        "in either update. At these shapes a step whose completions all run to max_new_tokens is "
        f"{f['total'] / 1e9:,.1f} GFLOP (layers {f['layers'] / f['forward']:.0%}, LM head "
        f"{f['lm_head'] / f['forward']:.0%}, attention {f['attention'] / f['forward']:.0%} of the forward).",
        "",
        "Shapes: userloop's from its `update/positions`; TRL's forwards were traced"
        + (f" (widths {res['results']['trl'].get('widths')}, no-grad forwards in its whole run: "
           f"{res['results']['trl'].get('no_grad_forwards')})" if "widths" in res["results"].get("trl", {}) else "")
        + ".",
        "",
        "Per-run figures (generation tok/s, update tok/s, update TFLOP/s; process s):",
        "",
    ]  # fmt: skip
    for cmd, r in res["results"].items():
        if "process_s_all" not in r:
            continue
        runs = [f"{fmt(x['gen_tokens_per_s'], 0)} / {fmt(x['update_tokens_per_s'], 0)} / {fmt(x['update_tflops'], 3)}"
                for x in r.get("per_run", [])]  # fmt: skip
        lines.append(f"- {cmd}: {'; '.join(runs)}; {r['process_s_all']}")
    return "\n".join(lines) + "\n"


def not_measured(command_line: str, device_command: str, why: str) -> str:
    """The section when no GPU is at hand: what was not measured, why, what exists and how to run it."""
    s = FULL
    return "\n".join([
        HEADING,
        "",
        f"**Not measured: {why}** (`{command_line}`, {utc_now()}; {machine()}). Every other table here is from the CPU.",
        "",
        "The measuring code exists (`benchmarks/gpu.py`, with `benchmarks/grpo_trl.py --phases` for TRL) and was "
        "checked on the CPU: `tests/test_gpu_bench.py` checks its model-FLOP count against torch's "
        "`FlopCounterMode` (forward + backward of a tiny Qwen3, eager attention: equal to the FLOP, asserted to "
        "1 %) and the "
        "peak table, and `python -m benchmarks.run --only gpu --quick` (run by tests/test_benchmarks_smoke.py) runs "
        "the whole path, both commands, interleaved, on a tiny model on the CPU. What the CPU cannot check: the "
        "GPU timings themselves, and that the full-size run fits in memory and in time.",
        "",
        f"The command, on an H200-class machine (threads: the CPU count, the default): `{device_command}`; on the "
        "device machine of this workplace, without pydantic or TRL, `benchmarks/gpu_wheels.sh` first (here), then "
        "the one-line command in `benchmarks/gpu.py`'s docstring with `.whl` carried.",
        "",
        f"What it measures, userloop against TRL side by side: {_describe(s)}. Per command: generation tokens/s "
        "(tokens sampled / time inside `generate`), update-step tokens/s (positions of the update's "
        "forward/backward / update time) and the update step's MFU: model FLOPs (3 x forward: 2 x matmul weights "
        "x positions, the LM head at the scored tokens, causal attention) / update time / the GPU's bf16 dense "
        "peak (989.4 TFLOP/s for H200 and H100 SXM, 756 for H100 PCIe, 312 for A100; another GPU needs "
        "`--peak-tflops`). Target: MFU of the update step >= 35 %.",
        "",
    ])  # fmt: skip


DEVICE_COMMAND = "python -m benchmarks.run --only gpu --write"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU (a smoke check)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of an unknown GPU")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--write", action="store_true", help=f"rewrite the section in --docs (default {DOCS})")
    ap.add_argument("--docs", type=Path, default=None)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                    help="userloop's parallel.strategy; fsdp trains sharded on one GPU (bf16 compute, float32 master "
                    "weights): compare without --write, which would replace the DDP section")  # fmt: skip
    args = ap.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    s = QUICK if args.quick else FULL
    s = s if args.rounds is None else replace(s, rounds=args.rounds)
    s = replace(s, parallel=args.parallel)
    command = (
        "python -m benchmarks.gpu"
        + (" --quick" if args.quick else "")
        + (" --write" if args.write else "")
        + (" --parallel fsdp" if args.parallel == "fsdp" else "")
    )
    if not args.quick and not torch.cuda.is_available():
        text = not_measured(command, DEVICE_COMMAND, "no CUDA device here")
    else:
        text = section(bench(s, threads, args.peak_tflops), f"OMP_NUM_THREADS={threads} {command}")
    print(text)
    if args.write:
        if args.quick and args.docs is None:
            ap.error("--quick --write needs --docs PATH")
        write_section(HEADING, text, args.docs or DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
