"""GRPO step time by rollout engine: in-process ``hf`` against the real vLLM server, side by side.

One vLLM server (the CPU build in ``.venv-vllm``, ``scripts/vllm_venv.sh``; ``trainer.testing.vllm_server``
starts it on loopback through the launcher's own launch code) serves every ``vllm`` run; each run is a
fresh ``launcher run`` process doing ``steps`` GRPO steps on the quickstart's task and tiny model
(``trainer.tiny.build_tiny_model(head_dim=32)``: vLLM's CPU attention refuses head_dim 16), full
fine-tuning, so every ``vllm`` step also hands the full weights over (save, pause, ``reload_weights``,
version, prefix-cache reset, resume). Runs are interleaved (hf, vllm, hf, vllm, ...) over two workloads:

- ``quickstart``: configs/quickstart_single_turn.yaml's shapes, 16 prompts x 16 = 256 completions of one
  token: per-request cost dominates;
- ``16 tokens``: 8 x 8 = 64 completions of up to 16 tokens: decoding counts too.

Reported per workload and engine, medians of the warm steps (the first ``warm_skip`` dropped) over runs:
``time/step_s``, ``time/generate_s`` (rollout), ``time/weight_sync_s`` (hand-over) and ``time/update_s``.
Without a vLLM environment the section says so instead of a table.

Cores are split as the pod splits GPUs: the server's engine is bound to the first CPU
(``VLLM_CPU_OMP_THREADS_BIND``) and every trainer, hf and vllm alike, to the others (``taskset``, OpenMP
threads = their count). Unsplit, the server's OpenMP threads spin on the cores the trainer's parallel
regions need between requests: measured on 2 cores, the trainer's update went from 0.1 s to 0.9 s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from benchmarks.common import (
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
)

HEADING = "## Rollout engines: GRPO step with hf vs vLLM"
KEYS = ("time/step_s", "time/generate_s", "time/weight_sync_s", "time/update_s")


@dataclass(frozen=True)
class EngineSettings:
    steps: int = 12
    warm_skip: int = 2
    rounds: int = 2
    # (name, prompts per step, completions per prompt, max_new_tokens)
    workloads: tuple[tuple[str, int, int, int], ...] = (("quickstart", 16, 16, 1), ("16 tokens", 8, 8, 16))


FULL = EngineSettings()
QUICK = EngineSettings(steps=3, warm_skip=1, rounds=1, workloads=(("quickstart", 4, 4, 1),))
ENGINES = ("hf", "vllm")


def _config(work: Path, model: Path, data: Path, engine: str, url: str, workload, s: EngineSettings) -> Path:
    name, batch, group, max_new = workload
    raw = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs/quickstart_single_turn.yaml").read_text()
    )
    raw.update(name=f"bench-{engine}", output_dir=str(work / "out"))
    raw["model"] = {"path": str(model)}
    raw["algorithm"].update(batch_size=batch, group_size=group, max_steps=s.steps, epochs=1000)
    raw["data"] = {"train": {"path": str(data)}, "use_chat_template": False}
    raw["rollout"].update(engine=engine, max_new_tokens=max_new)
    if engine == "vllm":
        raw["rollout"]["vllm"] = {"url": url, "weights_dir": str(work / "weights")}
    raw["checkpoint"] = {"save_final": False, "resume": "never"}
    raw["eval"] = {}
    raw["logging"] = {"every_steps": 1, "plots": False}
    path = work / f"{engine}-{name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _split_cpus() -> tuple[list[int], list[int]]:
    """(the server's CPUs, the trainers'): the first CPU for the server, the rest for the trainer."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[:1], cpus[1:]) if len(cpus) > 1 and shutil.which("taskset") else (cpus, cpus)


def bench(s: EngineSettings, threads: int, log=print) -> dict:
    from benchmarks.grpo_step import _launcher
    from trainer.tasks import write_task_files
    from trainer.testing.vllm_server import VLLMServer, vllm_python
    from trainer.tiny import build_tiny_model

    python = vllm_python()
    if python is None:
        return {"measured": False, "why": "no vLLM environment (scripts/vllm_venv.sh builds .venv-vllm)"}
    work = Path(tempfile.mkdtemp(prefix="userloop-bench-engines-"))
    try:
        model, data = work / "model", work / "train.jsonl"
        info = build_tiny_model(model, head_dim=32)
        write_task_files("next-letter", data, None, 512, 0, 0)
        server_cpus, trainer_cpus = _split_cpus()
        pin = ["taskset", "-c", ",".join(map(str, trainer_cpus))] if server_cpus != trainer_cpus else []
        threads = min(threads, len(trainer_cpus))
        bind = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, server_cpus))} if pin else {}
        with VLLMServer(model, work / "vllm.log", python, lora_rank=None, env=bind) as server:
            vllm_version = json.loads(run_timed([python, "-c", "import json, vllm; print(json.dumps(vllm.__version__))"],
                                                bench_env(threads)).stdout)  # fmt: skip
            results: dict[str, dict] = {}
            for workload in s.workloads:

                def make(engine: str, workload=workload):
                    config = _config(work, model, data, engine, server.url, workload, s)

                    def go(rnd: int) -> dict[str, list[float]]:
                        out = work / f"out-{engine}-{rnd}"
                        t = run_timed([*pin, _launcher(), "run", str(config), "--set", f"output_dir={out}"],
                                      bench_env(threads))  # fmt: skip
                        rows = [json.loads(x) for x in (out / "logs/metrics.jsonl").read_text().splitlines()]
                        shutil.rmtree(out, ignore_errors=True)
                        got = {k: [r[k] for r in rows] for k in KEYS}
                        log(f"engines {workload[0]} {engine} round {rnd}: process {t.wall_s:.1f} s, steps "
                            f"{[round(x, 3) for x in got['time/step_s']]}")  # fmt: skip
                        return got

                    return go

                runs = interleave({e: make(e) for e in ENGINES}, s.rounds)
                results[workload[0]] = {
                    e: {k: median([median(r[k][s.warm_skip :]) for r in runs[e]]) for k in KEYS}
                    | {"step_s_all": [round(median(r["time/step_s"][s.warm_skip :]), 4) for r in runs[e]]}
                    for e in ENGINES
                }
        return {"measured": True, "settings": asdict(s), "threads": threads, "model": info, "results": results,
                "vllm": vllm_version, "server_cpus": server_cpus, "trainer_cpus": trainer_cpus,
                "machine": machine(), "load": load_average(), "when": utc_now(), "code": code_version()}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def section(res: dict, command_line: str) -> str:
    if not res["measured"]:
        return "\n".join([HEADING, "", f"**Not measured: {res['why']}** (`{command_line}`, {utc_now()}).",
                          "", "Build it with `scripts/vllm_venv.sh` (or set `USERLOOP_VLLM_PYTHON`) and rerun."]) + "\n"  # fmt: skip
    s = EngineSettings(**{k: tuple(tuple(w) for w in v) if k == "workloads" else v
                          for k, v in res["settings"].items()})  # fmt: skip
    m = res["model"]
    lines = [
        HEADING,
        "",
        f"Measured {res['when']} ({res['code']}) with `{command_line}` (load average at the end {res['load']}).",
        f"Machine: {res['machine']}. Trainer: {versions('torch', 'transformers')}; server: vLLM {res['vllm']} "
        f"(CPU build, bfloat16, `--logprobs-mode processed_logprobs`). CPUs: the server's engine on "
        f"{res['server_cpus']}, every trainer (hf and vllm) on {res['trainer_cpus']} with "
        f"`OMP_NUM_THREADS={res['threads']}` (the pod's disjoint GPUs, on a CPU).",
        "",
        f"Settings: next-letter task (configs/quickstart_single_turn.yaml), tiny Qwen3 "
        f"(`build_tiny_model(head_dim=32)`: {m['parameters']:,} parameters), full fine-tuning (every vLLM step "
        f"hands the full weights over), {s.steps} steps per `launcher run` process, medians of steps "
        f"{s.warm_skip + 1}-{s.steps}, then over {s.rounds} interleaved rounds (hf, vllm, hf, ...).",
        "",
        "| workload | engine | step (s) | generate (s) | weight hand-over (s) | update (s) | step / hf |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, batch, group, max_new in s.workloads:
        by = res["results"][name]
        for engine in ENGINES:
            r = by[engine]
            ratio = r["time/step_s"] / by["hf"]["time/step_s"]
            lines.append(f"| {name} ({batch}x{group}, {max_new} tok) | {engine} | {fmt(r['time/step_s'], 3)} | "
                         f"{fmt(r['time/generate_s'], 3)} | {fmt(r['time/weight_sync_s'], 3)} | "
                         f"{fmt(r['time/update_s'] - r['time/weight_sync_s'], 3)} | {fmt(ratio)} |")  # fmt: skip
    lines += ["", "generate = `time/generate_s` (rollout: requests, decode, rewards); weight hand-over = "
              "`time/weight_sync_s` (~0 for hf); update = `time/update_s` minus the hand-over, which GRPO times "
              "inside it (loss forward/backward, clipping, AdamW).", "",
              "Per-run warm step medians (s); the fastest is the better estimate of an engine's own cost on a "
              "machine shared with other work (interference only adds time):", ""]  # fmt: skip
    for name, by in res["results"].items():
        for engine, r in by.items():
            lines.append(f"- {name} {engine}: {r['step_s_all']} (fastest {fmt(min(r['step_s_all']), 3)})")
    lines += ["", "On a tiny model on the CPU the server cannot win: each step pays HTTP and scheduling per "
              "request plus a full save-and-reload of the weights, "
              "while in-process generation of a 109k-parameter model costs almost nothing. The table measures "
              "that fixed cost per step; how it compares with generation on a GPU sidecar with a real model is "
              "not measured here."]  # fmt: skip
    return "\n".join(lines) + "\n"


def with_rounds(s: EngineSettings, rounds: int | None) -> EngineSettings:
    return s if rounds is None else replace(s, rounds=rounds)
