"""SGLang against SGLang's own definitions: the sidecar's command lines, the client's requests, the double's rules.

A double written by us proves only that we agree with ourselves. Here the other side is SGLang 0.5.19's own
code, installed without its CUDA dependencies by ``scripts/sglang_pure.sh`` and run in a subprocess
(``tests/sglang_pure/check.py``; without it those tests skip and say so):

- every sidecar command line the chart renders (and ``launcher run`` launches) goes through SGLang's argument
  parser, its resolution pipeline and its launch-time checks;
- every request the client sent during real generations and hand-overs (recorded by the double) is on a live
  SGLang route and validates as the request struct that route's handler declares;
- the double serves only SGLang's routes and copies SGLang's constants (LoRA modules, the per-batch default,
  module normalisation, the health check's timeout, the disconnect notice).

The rest runs without SGLang: the double enforces the rules it copies, and the production bugs found by
reading SGLang's source stay fixed, each with a test that failed before its fix: a LoRA sidecar that never
started (max_loaded_loras below max_loras_per_batch), the sidecar's liveness probe on /health (a generation
that waits behind a weight reload), and ``/get_weight_version`` (404 in 0.5.19: every full-weight hand-over
failed; ``test_sglang_engine.py``'s disk-sync tests). The retried ``/generate`` under the same rid is
``test_sglang_engine.py::test_a_reset_generate_is_retried_under_a_fresh_rid``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from launcher.local_server import local_server
from launcher.render import render
from launcher.values import sglang_args
from trainer.config import load_config, parse_config
from trainer.engines import SamplingParams, build_engine
from trainer.model import load_policy, load_tokenizer
from trainer.testing import sglang_server
from trainer.testing.sglang_server import SGLangDouble, check_args, normalized_modules, parse_args

REPO = Path(__file__).resolve().parents[2]
SGLANG_PURE = REPO / ".cache" / "sglang-0.5.19"
CHECK = REPO / "tests" / "sglang_pure" / "check.py"
FLAGSHIP = REPO / "configs" / "intentiongym.yaml"
FIXTURE = REPO / "tests" / "launcher" / "data" / "sidecar.yaml"
LORA = {
    "enabled": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "o_proj"],
}
SIDECAR = ["rollout.engine=sglang", "cluster.gpus_per_node=2", "cluster.rollout_gpus_per_node=1"]
# The dimensions of the config that reach the sidecar's flags, each varied once from a config as given.
VARIANTS = {
    "as-is": [],
    "lora-modules": ["model.lora.enabled=true", "model.lora.r=16",
                     "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
    "lora-all-linear": ["model.lora.enabled=true", "model.lora.target_modules=all-linear"],
    "lora-four-loaded": ["model.lora.enabled=true", "cluster.sglang.max_loaded_loras=4"],
    "tp-2": ["cluster.gpus_per_node=4", "cluster.rollout_gpus_per_node=2"],
    "bf16": ["model.dtype=bfloat16"],
    "fp16": ["model.dtype=float16"],
    "fp32": ["model.dtype=float32"],
    "two-nodes": ["cluster.nodes=2", "cluster.pvc.access_mode=ReadWriteMany"],
    "trainjob": ["cluster.api=trainjob"],
}  # fmt: skip
needs_sglang = pytest.mark.skipif(
    not (SGLANG_PURE / "sglang").is_dir(),
    reason="SGLang 0.5.19's pure-Python parts are not installed: run scripts/sglang_pure.sh",
)


def _without(args: list[str], *flags: str) -> list[str]:
    """``args`` less ``flags`` and their values (the double picks its own model path, host and port)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def _sidecar_args(objects: list[dict[str, Any]]) -> list[list[str]]:
    """The args of every `sglang` init container in the rendered objects (PyTorchJob replicas, TrainJob runtime)."""
    found: list[list[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(c["args"] for c in node.get("initContainers") or [] if c.get("name") == "sglang")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for obj in objects:
        walk(obj)
    return found


def rendered_command_lines(tiny_model: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every distinct sidecar command line the chart renders from the configs and their variants, plus what
    ``launcher run`` launches with ``rollout.sglang.launch``; the model path is the tiny model's (SGLang's
    resolution reads the model's config, and hub ids cannot be fetched here)."""
    lines: dict[str, list[str]] = {}
    bases = [p for p in sorted((REPO / "configs").rglob("*.yaml")) if load_config(p).cluster.sidecar]
    assert FLAGSHIP in bases  # the flagship runs SGLang as the pod's sidecar
    for base in [*bases, FIXTURE]:
        sidecar = [] if load_config(base).cluster.sidecar else SIDECAR
        for name, changes in VARIANTS.items():
            cfg = load_config(base, [*sidecar, *changes])
            for args in _sidecar_args(render(cfg, "contract-01020304").objects):
                args = [
                    str(tiny_model) if i and args[i - 1] == "--model-path" else a for i, a in enumerate(args)
                ]
                lines.setdefault(json.dumps(args), [f"{base.name}:{name}", args])
        local = local_server(
            load_config(base, [*sidecar, "rollout.sglang.launch=true"]), tmp_path / "log", env={}
        )
        args = _without(local.args, "--model-path")
        lines.setdefault(
            json.dumps(args), [f"{base.name}:launcher-run", ["--model-path", str(tiny_model), *args]]
        )
    return dict(lines.values())


def sglang_check(job: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """SGLang's verdicts (tests/sglang_pure/check.py in a subprocess, with the installed SGLang first on the path)."""
    job_path, result = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
    env["PYTHONPATH"] = str(SGLANG_PURE)
    proc = subprocess.run([sys.executable, str(CHECK), str(job_path), str(result)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(result.read_text())


def _config(tmp: Path, tiny_model: Path, **changes: Any):
    raw = yaml.safe_load((REPO / "configs" / "quickstart_single_turn.yaml").read_text())
    raw.update(name="contract", output_dir=str(tmp / "runs" / "{name}"))
    raw["model"] = {"path": str(tiny_model)}
    raw["data"].update(train={"path": str(tmp / "train.jsonl")}, val={"path": str(tmp / "val.jsonl")})
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(raw)


# ----------------------------------------------------------------------------- the double, started as the chart says


@pytest.fixture(scope="module")
def sidecar(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The double started with the flags the chart gives a LoRA sidecar, recording every request it gets."""
    tmp = tmp_path_factory.mktemp("contract")
    cfg = _config(tmp, tiny_model, model__lora=LORA, rollout__engine="sglang",
                  rollout__sglang={"weights_dir": str(tmp / "weights")},
                  cluster__gpus_per_node=2, cluster__rollout_gpus_per_node=1)  # fmt: skip
    flags = _without(sglang_args(cfg), "--model-path", "--host", "--port")
    record = tmp / "requests.jsonl"
    with SGLangDouble(tiny_model, *flags, "--record", str(record)) as s:
        yield s, cfg, flags, record


@pytest.fixture(scope="module")
def traffic(sidecar, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the client sends in a run's life against that sidecar: start-up, LoRA hand-overs (one retried),
    generations with and without log-probs, greedy, a reset connection; then a full-weight hand-over."""
    s, cfg, _, record = sidecar
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.sglang.url = s.url
    tok = load_tokenizer(cfg.model.path)
    engine = build_engine(cfg, load_policy(cfg.model, torch.device("cpu")), tok)  # start: hands step 0 over
    prompts = [tok.encode("The letter after a is"), tok.encode("The letter after q is")]
    for params in (SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=3, top_p=0.9, top_k=5),
                   SamplingParams(max_new_tokens=2, temperature=0.0)):  # fmt: skip
        engine.generate(prompts, 2, params)
    httpx.post(s.url + "/_double/drop_generates", json={"n": 1})
    engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=2))
    engine.sync_weights(1)
    httpx.post(s.url + "/_double/fail_updates", json={"n": 1})
    engine.sync_weights(2)  # the retry asks whether the failed attempt landed (a one-token /generate)
    after_lora = httpx.get(s.url + "/_double/stats").json()
    disk = cfg.model_copy(deep=True)
    disk.model.lora.enabled = False
    disk.rollout.sglang.sync = "disk"
    full = build_engine(disk, load_policy(disk.model, torch.device("cpu")), tok)
    full.generate(prompts[:1], 1, SamplingParams(max_new_tokens=2))
    full.sync_weights(3)
    requests = [json.loads(line) for line in record.read_text().splitlines()]
    return {"lora": engine, "full": full, "stats": after_lora, "requests": requests}


def test_a_lora_sidecar_starts_with_the_flags_the_chart_renders(sidecar, traffic) -> None:
    """SGLang asserts max_loaded_loras >= max_loras_per_batch (default 8) at start; the chart passed
    --max-loaded-loras 2 alone, so a LoRA sidecar never started (the double, enforcing that rule, exited 1)."""
    _, _, flags, _ = sidecar
    assert flags[flags.index("--max-loaded-loras") + 1] == "2"
    assert flags[flags.index("--max-loras-per-batch") + 1] == "2"
    assert traffic["lora"].lora_name == "policy-n0-v2" and traffic["stats"]["adapters"] == ["policy-n0-v2"]
    assert traffic["full"].weight_version == "v3"
    rids = traffic["stats"]["rids"]
    assert len(rids) == len(set(rids))  # the reset request's retry went out under a new id


def test_the_double_refuses_to_start_where_sglang_does() -> None:
    """``check_lora_server_args``'s rules, as the double applies them to its flags (SGLang's messages)."""
    base = ["--model-path", "m", "--enable-lora"]
    cases = {
        "--max-lora-rank 8 --lora-target-modules q_proj --max-loaded-loras 2": "max_loaded_loras should be greater",
        "--max-lora-rank 8": "you need to specify both --max-lora-rank and --lora-target-modules",
        "--max-lora-rank 8 --lora-target-modules all q_proj": "it should be the only module specified",
    }
    for flags, message in cases.items():
        with pytest.raises(AssertionError, match=message):
            check_args(parse_args([*base, *flags.split()]))
    chart = ["--max-lora-rank", "8", "--lora-target-modules", "q_proj", "--max-loaded-loras", "2",
             "--max-loras-per-batch", "2"]  # fmt: skip
    check_args(parse_args([*base, *chart]))
    with pytest.raises(SystemExit):  # argparse: not one of SGLang's LoRA target modules
        parse_args([*base, "--lora-target-modules", "c_attn"])


def _save_adapter(tiny_model: Path, where: Path, r: int, modules: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules)).save_pretrained(where)
    return where


def test_the_double_loads_adapters_within_the_reservation_and_evicts_the_least_recently_used(
    sidecar, traffic, tiny_model, tmp_path
) -> None:
    """The sidecar reserved rank 8 for q/v/o_proj (normalised: qkv_proj, o_proj) and 2 loaded adapters."""
    s, _, _, _ = sidecar

    def load(name: str, path: Path) -> httpx.Response:
        return httpx.post(
            s.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60
        )

    too_big = load("big", _save_adapter(tiny_model, tmp_path / "big", 16, ["q_proj"]))
    outside = load("mlp", _save_adapter(tiny_model, tmp_path / "mlp", 8, ["gate_proj"]))
    for r in (too_big, outside):
        assert r.status_code == 400 and "incompatible with the current LoRA memory pool" in r.text, r.text
    fits = _save_adapter(tiny_model, tmp_path / "fits", 8, ["k_proj", "o_proj"])  # k_proj is in qkv_proj
    for name in ("a", "b", "c"):
        assert load(name, fits).status_code == 200
    adapters = httpx.get(s.url + "/_double/stats").json()["adapters"]
    assert sorted(adapters) == ["b", "c"]  # beyond --max-loaded-loras 2 the least recently used went
    assert load("c", fits).status_code == 400  # a loaded name is refused
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
    # An adapter loaded once comes back when a request names it (SGLang's lora_ref_cache); a new name is a 400.
    assert httpx.post(s.url + "/generate", json={**body, "lora_path": "a"}, timeout=30).status_code == 200
    never = httpx.post(s.url + "/generate", json={**body, "lora_path": "zzz"}, timeout=30)
    assert never.status_code == 400 and "never been loaded" in never.text
    for name in ("a", "b", "c"):
        httpx.post(s.url + "/unload_lora_adapter", json={"lora_name": name})


def test_the_sidecars_liveness_probe_answers_while_a_long_weight_reload_runs(
    sidecar, traffic, tiny_model
) -> None:
    """SGLang's /health is a one-token generation that queues behind /update_weights_from_disk and answers
    503 after 20 s: as the liveness probe it got the sidecar restarted mid hand-over of a large model. The
    chart's probe path must answer from the server's state while the model is busy."""
    s, cfg, _, _ = sidecar
    pod = next(o for o in render(cfg, "probe-01020304").objects if o["kind"] == "PyTorchJob")
    spec = pod["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = spec["initContainers"]
    probes = {kind: container[kind]["httpGet"]["path"] for kind in ("livenessProbe", "readinessProbe")}
    httpx.post(s.url + "/_double/slow_reloads", json={"n": 1, "s": 4})
    reload = threading.Thread(target=httpx.post, args=(s.url + "/update_weights_from_disk",),
                              kwargs={"json": {"model_path": str(tiny_model)}, "timeout": 60})  # fmt: skip
    reload.start()
    try:
        deadline = time.monotonic() + 30
        while not httpx.get(s.url + "/_double/stats").json()["reloading"]:  # the reload holds the model
            assert time.monotonic() < deadline, "the reload never started"
            time.sleep(0.05)
        for kind, path in probes.items():
            t0 = time.monotonic()
            assert httpx.get(s.url + path, timeout=1.5).status_code == 200, (kind, path)
            assert time.monotonic() - t0 < 1.0, (kind, path)
        with pytest.raises(httpx.ReadTimeout):  # what /health does meanwhile: it waits for the model
            httpx.get(s.url + "/health", timeout=1.0)
    finally:
        reload.join()


@needs_sglang
def test_the_doubles_rules_are_sglangs_own_constants(verdicts) -> None:
    sglang, double = verdicts["rules"], sglang_server
    assert sglang["supported_lora_target_modules"] == list(double.SUPPORTED_LORA_TARGET_MODULES)
    assert sglang["max_loras_per_batch"] == double.MAX_LORAS_PER_BATCH
    assert sglang["normalized"] == {m: sorted(normalized_modules([m])) for m in sglang["normalized"]}
    assert sglang["health_check_timeout_s"] == double.HEALTH_CHECK_TIMEOUT_S
    assert sglang["health_generates"] is double.HEALTH_GENERATES
    assert sglang["request_state_wait_timeout_s"] == double.DISCONNECT_NOTICE_S


# ----------------------------------------------------------------------------- SGLang's own verdicts


@pytest.fixture(scope="module")
def verdicts(traffic, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of SGLang's checks over every command line and every recorded request (one import: ~10 s)."""
    if not (SGLANG_PURE / "sglang").is_dir():
        pytest.skip("SGLang 0.5.19's pure-Python parts are not installed: run scripts/sglang_pure.sh")
    tmp = tmp_path_factory.mktemp("verdicts")
    lines = rendered_command_lines(tiny_model, tmp)
    vocab = len(load_tokenizer(str(tiny_model)))
    out = sglang_check({"command_lines": list(lines.values()), "requests": traffic["requests"],
                        "vocab_size": vocab}, tmp)  # fmt: skip
    out["names"] = list(lines)
    return out


@needs_sglang
def test_every_sidecar_command_line_the_chart_renders_passes_sglangs_own_checks(verdicts) -> None:
    failed = {
        n: v["error"]
        for n, v in zip(verdicts["names"], verdicts["command_lines"], strict=True)
        if not v["ok"]
    }
    assert not failed, failed
    assert any("lora" in n for n in verdicts["names"]) and any(
        ":launcher-run" in n for n in verdicts["names"]
    )


@needs_sglang
def test_every_request_the_client_sends_validates_as_sglangs_request_structs(traffic, verdicts) -> None:
    requests = traffic["requests"]
    failed = [(r["route"], r["body"], v["error"]) for r, v in zip(requests, verdicts["requests"], strict=True)
              if not v["ok"]]  # fmt: skip
    assert not failed, failed
    routes = {f"{r['method']} {r['route']}" for r in requests}
    # The client's whole vocabulary was exercised: generation, both hand-overs, aborts, the readiness checks.
    assert {"POST /generate", "POST /load_lora_adapter", "POST /unload_lora_adapter", "POST /abort_request",
            "POST /update_weights_from_disk", "GET /model_info", "GET /health_generate",
            "GET /get_server_info"} <= routes, routes  # fmt: skip
    for route in routes:  # each on a live SGLang route, none on one that only answers 404
        assert verdicts["routes"].get(route) == [], (route, verdicts["routes"].get(route, "no such route"))


@needs_sglang
def test_the_double_serves_sglangs_routes_and_refuses_its_dead_ones(verdicts) -> None:
    app = sglang_server.build_app(sglang_server._State(parse_args(["--model-path", "m"])))
    served = {f"{r.method} {r.resource.canonical}" for r in app.router.routes() if r.method != "HEAD"}
    real = verdicts["routes"]
    mine = {r for r in served if not r.split()[1].startswith("/_double/")}
    assert mine <= set(real), sorted(mine - set(real))
    # SGLang 0.5.19's deprecated /get_weight_version answers 404; the double does too (the client must not use it).
    assert {r for r in mine if real[r] == ["dead"]} == {"GET /get_weight_version", "GET /weight_version"}
