"""The vLLM engine against the REAL vLLM server (0.32, its CPU build) on loopback: no double.

vLLM lives in its own environment (``scripts/vllm_venv.sh`` builds ``.venv-vllm`` from
constraints-vllm.txt; ``USERLOOP_VLLM_PYTHON`` names another); without one every test here skips and says
why. One server is started per session through the launcher's own launch code (``trainer.testing.vllm_server``:
``LocalVLLM``, the sidecar's flags and environment, 127.0.0.1 only), serving a tiny random Qwen3 with
``head_dim=32`` (the CPU attention kernel refuses 16), in bfloat16 as on a GPU, with LoRA reserved. The
``launcher run`` test starts a second one of its own, which it kills.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from trainer import api
from trainer.config import load_config
from trainer.engines import SamplingParams, build_engine
from trainer.engines.hf import HFEngine
from trainer.engines.vllm import VLLM_VERSION, VLLMError
from trainer.errors import EXIT_FAILED, UserError
from trainer.model import load_policy, load_tokenizer
from trainer.testing.serve import free_port
from trainer.testing.vllm_server import VLLMServer, vllm_python

REPO = Path(__file__).resolve().parents[2]
PYTHON = vllm_python()
# The end-to-end tier (`make test-slow`): a real server, ~2 min with its start-ups.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PYTHON is None,
        reason="no vLLM environment: build .venv-vllm with scripts/vllm_venv.sh, or set USERLOOP_VLLM_PYTHON",
    ),
]
LORA = {
    "enabled": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "o_proj"],
}
BF16_ATOL = 0.05  # |log p| differences of a bf16 server against the trainer's fp32 (measured: ~0.002)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-qwen3-hd32"
    build_tiny_model(path, head_dim=32)
    return path


@pytest.fixture(scope="session")
def server(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory):
    s = VLLMServer(vllm_model, tmp_path_factory.mktemp("vllm") / "vllm.log", PYTHON)
    try:
        s.start()
    except UserError as e:
        pytest.fail(f"the vLLM server did not start: {e}")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def base_weights(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained weights as a hand-over folder (with the tied head written out: see write_tied_head)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from trainer.engines.vllm import write_tied_head

    path = tmp_path_factory.mktemp("base") / "weights"
    shutil.copytree(vllm_model, path)
    write_tied_head(AutoModelForCausalLM.from_pretrained(vllm_model), path)
    return path


@pytest.fixture
def base(server: VLLMServer, base_weights: Path) -> VLLMServer:
    """The server back on the untrained weights, no adapters: what a fresh sidecar holds."""
    c = httpx.Client(base_url=server.url, timeout=60)
    for name in _adapters(server):
        c.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert c.post("/collective_rpc", json={"method": "reload_weights",
                                           "kwargs": {"weights_path": str(base_weights)}}).status_code == 200  # fmt: skip
    c.post("/update_weight_version", json={"new_version": "base"})
    c.post("/reset_prefix_cache")
    return server


def _adapters(server: VLLMServer) -> list[str]:
    data = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    return sorted(m["id"] for m in data if m.get("parent"))


def _weight_version(server: VLLMServer) -> str:
    return httpx.get(server.url + "/weight_info", timeout=30).json()["weight_version"]


def _config(make_config, tmp_path: Path, server: VLLMServer, model: Path, name: str = "vl", **changes):
    vllm = {"url": server.url, "weights_dir": str(tmp_path / "weights"), **changes.pop("vllm", {})}
    return load_config(make_config(name, **{"model__path": str(model), "rollout__engine": "vllm",
                                            "rollout__vllm": vllm, **changes}))  # fmt: skip


def _engine(cfg):
    tok = load_tokenizer(cfg.model.path)
    model = load_policy(cfg.model, torch.device("cpu"))
    return build_engine(cfg, model, tok), model, tok


def _prompts(tok, n: int) -> list[list[int]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [tok.encode(f"The letter after {letters[i % 26]} is") for i in range(n)]


def _trainer_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """What the GRPO loss scores: log-softmax of the temperature-scaled logits at each completion token."""
    from trainer.grpo import token_logprobs, trajectory_batch
    from trainer.rollout import Trajectory

    t = Trajectory(prompt + completion, [0] * len(prompt) + [1] * len(completion), 0.0, {}, None, 1,
                   len(completion), True)  # fmt: skip
    batch = trajectory_batch([t], [0.0], 0, "cpu")
    with torch.no_grad():
        logp = token_logprobs(model, batch, temperature)[0][0]
    return logp[len(prompt) - 1 :]


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.output_dir) / "logs/metrics.jsonl").read_text().splitlines()]


def test_generation_and_logprobs_match_the_trainer_on_the_first_step(base, make_config, tmp_path,
                                                                      vllm_model) -> None:  # fmt: skip
    """Token-in/token-out through /v1/completions: the ids the trainer masks are the server's, and the server's
    log-probs (after temperature: --logprobs-mode processed_logprobs) are the trainer's within bf16 rounding."""
    cfg = _config(make_config, tmp_path, base, vllm_model)
    engine, model, tok = _engine(cfg)
    assert engine.weight_version == "v0" and _weight_version(base) == "v0"  # start hands the weights over
    assert httpx.get(base.url + "/version").json()["version"] == VLLM_VERSION
    prompts = _prompts(tok, 4)
    stop = set(engine.stop_ids)
    worst = 0.0
    for temperature in (1.0, 0.7):
        out = engine.generate(prompts, 3, SamplingParams(max_new_tokens=6, temperature=temperature))
        assert [len(g) for g in out] == [3, 3, 3, 3]
        for prompt, group in zip(prompts, out, strict=True):
            for c in group:
                assert c.prompt_ids == prompt and 1 <= len(c.completion_ids) <= 6
                assert c.finished == (c.completion_ids[-1] in stop) and not stop & set(c.completion_ids[:-1])
                assert c.text == tok.decode(c.completion_ids, skip_special_tokens=True)
                mine = _trainer_logprobs(model, prompt, c.completion_ids, temperature)
                worst = max(worst, float((mine - torch.tensor(c.logprobs)).abs().max()))
    assert worst < BF16_ATOL, worst
    # Greedy is deterministic; truncated sampling reports no log-probs (the trainer does not score that one).
    a = engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert a[0][0].completion_ids == a[0][1].completion_ids
    for params in (SamplingParams(max_new_tokens=3, top_p=0.5), SamplingParams(max_new_tokens=3, top_k=3)):
        assert all(c.logprobs is None for g in engine.generate(prompts, 2, params) for c in g)
    engine.close()


def test_a_full_weight_hand_over_changes_greedy_output_and_is_seen_by_the_next_step(
    base, make_config, tmp_path, vllm_model
) -> None:
    """pause (in-flight finish) -> reload_weights -> version v<step> -> prefix cache dropped -> resume."""
    cfg = _config(make_config, tmp_path, base, vllm_model)
    engine, model, tok = _engine(cfg)
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0)
    prompts = _prompts(tok, 3)
    before = engine.generate(prompts, 1, greedy)  # also fills the prefix cache with the old weights' keys
    target = tok.convert_tokens_to_ids("z")
    top = before[0][0].completion_ids[0]
    with torch.no_grad():  # the head is tied to the embedding (as in Qwen3-0.6B): the case vLLM mishandles
        # "z" scores 3x what the untrained model's favourite scores: greedy says "z" with a margin of ~1 logit
        # (measured), which bf16 rounding cannot flip.
        model.lm_head.weight[target] = 3.0 * model.lm_head.weight[top]
    expected = [g[0].completion_ids for g in HFEngine(model, tok).generate(prompts, 1, greedy)]
    engine.sync_weights(7)
    after = engine.generate(prompts, 1, greedy)
    assert [g[0].completion_ids for g in after] == expected == [[target] * 3] * 3 and before != after
    assert _weight_version(base) == "v7" and httpx.get(base.url + "/is_paused").json() == {"is_paused": False}
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v7.a1"]  # older copies deleted
    # The next step's samples are scored by the trainer as the server sampled them.
    (c,), = engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=4))  # fmt: skip
    assert float((_trainer_logprobs(model, c.prompt_ids, c.completion_ids, 1.0) - torch.tensor(c.logprobs))
                 .abs().max()) < BF16_ATOL  # fmt: skip
    # A server that lost the weights (restarted: version "default") is refused before it answers.
    httpx.post(base.url + "/update_weight_version", json={"new_version": "default"})
    with pytest.raises(VLLMError, match=r"weight_version 'default', expected 'v7'.*stale weights"):
        engine.generate(prompts[:1], 1, greedy)
    engine.close()


def test_a_lora_hand_over_changes_greedy_output_and_each_step_samples_the_new_adapter(
    base, make_config, tmp_path, vllm_model
) -> None:
    cfg = _config(make_config, tmp_path, base, vllm_model, model__lora=LORA)
    assert cfg.rollout.vllm.sync == "lora"
    engine, model, tok = _engine(cfg)
    assert engine.lora_name == "policy-n0-v0" and _adapters(base) == ["policy-n0-v0"]
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = engine.generate(_prompts(tok, 4), 1, greedy)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    engine.sync_weights(1)
    assert engine.lora_name == "policy-n0-v1" and _adapters(base) == ["policy-n0-v1"]  # the old one unloaded
    after = engine.generate(_prompts(tok, 4), 1, greedy)
    assert before != after
    c = after[0][0]
    assert float((_trainer_logprobs(model, c.prompt_ids, c.completion_ids, 1.0) - torch.tensor(c.logprobs))
                 .abs().max()) < BF16_ATOL  # fmt: skip
    engine.lora_name = "policy-n0-v99"  # an adapter the server does not hold: vLLM's 404, surfaced
    with pytest.raises(VLLMError, match="does not exist"):
        engine.generate(_prompts(tok, 1), 1, greedy)
    engine.close()
    # A GRPO run: every step hands its adapter over and samples from it (the trainer's log-probs, each step).
    # tis_cap 1.0: the truncated importance-sampling weight min(p_trainer / p_engine, 1) must be active (the
    # server samples in bf16, so about half the tokens have a ratio above 1) and bounded.
    run = _config(make_config, tmp_path, base, vllm_model, "vl-lora", model__lora=LORA, algorithm__max_steps=3,
                  algorithm__lr=2e-2, algorithm__tis_cap=1.0, checkpoint__save_every_steps=None,
                  eval__every_steps=None)  # fmt: skip
    api.train(run)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["rollout/logprob_diff"] < 0.01 for r in rows), (
        rows
    )
    assert all(r["rollout/logprob_diff"] > 0 and 0.05 < r["rollout/tis_clip_frac"] < 0.95 for r in rows), rows
    assert "tis_clip" in (Path(run.output_dir) / "logs" / "train.log").read_text()
    assert _adapters(base) == ["policy-n0-v3"]


def _metric(server: VLLMServer, prefix: str) -> float:
    """The sum of the Prometheus samples of /metrics whose line starts with ``prefix``."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_timed_out_request_is_aborted_on_the_server_then_sent_again(base, make_config, tmp_path,
                                                                      vllm_model) -> None:  # fmt: skip
    """SGLang's rule, shared code: a request that outlives rollout.vllm.timeout_s is freed on the server
    (/abort_requests, which answers {"aborted": 1} for the id cmpl-<rid>-0: checked by hand; vLLM also aborts
    a request whose client hung up), then sent again under a fresh id (<rid>.2).
    The engine is held in a 3 s reload, so the first attempt (2 s) times out and the retry is answered."""
    # LoRA: no /weight_info check before the request (the adapter name is the version), so it is the
    # request itself that waits for the engine.
    cfg = _config(make_config, tmp_path, base, vllm_model, model__lora=LORA, vllm={"timeout_s": 2.0})
    engine, _, tok = _engine(cfg)
    aborts = 'http_requests_total{handler="/abort_requests",method="POST",status="2xx"}'
    before = _metric(base, aborts)
    blocker = threading.Thread(target=lambda: httpx.post(base.url + "/collective_rpc", timeout=60, json={
        "method": "slow_reload_weights", "kwargs": {"weights_path": str(vllm_model), "delay_s": "3"}}))  # fmt: skip
    blocker.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    (c,), = engine.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=3))  # fmt: skip
    took = time.monotonic() - t0
    blocker.join(timeout=60)
    engine.close()
    assert c.completion_ids and 2.0 < took < 8.0, took
    assert _metric(base, aborts) == before + 1  # the timed-out attempt was freed (by id cmpl-<rid>-0)
    assert _metric(base, "vllm:num_requests_running{") == 0


def test_the_quickstart_reward_rises_with_vllm_as_with_hf(base, make_config, tmp_path, vllm_model) -> None:
    """configs/quickstart_single_turn.yaml, 60 of its steps, through the server and in-process: both learn,
    and every step's samples are the current policy's (a stale hand-over shows as a growing logprob_diff)."""
    steps, results = 60, {}
    for engine in ("hf", "vllm"):
        cfg = _config(make_config, tmp_path, base, vllm_model, f"q-{engine}", rollout__engine=engine,
                      algorithm__max_steps=steps, checkpoint__save_every_steps=None, eval__every_steps=None,
                      logging__plots=False)  # fmt: skip
        assert cfg.rollout.engine == engine
        t0 = time.monotonic()
        api.train(cfg)
        rows = _metrics(cfg)
        k = steps // 5
        results[engine] = (sum(r["reward/mean"] for r in rows[:k]) / k, sum(r["reward/mean"] for r in rows[-k:]) / k,
                           time.monotonic() - t0, rows)  # fmt: skip
    for engine, (first, last, _, _) in results.items():
        # Measured (2 cores): hf 0.018 -> 0.164, vllm 0.019-0.023 -> 0.13-0.16 over steps 1-12 -> 49-60; an
        # untrained model scores ~0.02 with a standard error of ~0.003 over a fifth's 3,072 samples.
        assert first < 0.06 and last > first + 0.05, (engine, first, last)
    assert results["vllm"][1] > 0.5 * results["hf"][1], results  # learns about as fast as in-process
    rows = results["vllm"][3]
    assert all(r["rollout/logprob_diff"] < 0.01 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    assert all(0 <= r["rollout/tis_clip_frac"] <= 1 for r in rows)  # TIS on by default for a server engine
    assert all(r["time/weight_sync_s"] > 0 for r in rows)
    print({e: f"{f:.3f} -> {la:.3f} in {t:.0f}s" for e, (f, la, t, _) in results.items()})


def test_a_slow_hand_over_does_not_trip_the_liveness_probe(base, make_config, tmp_path, vllm_model) -> None:
    """The sidecar's liveness probe is GET /health (timeout 10 s, 5 failures 30 s apart). vLLM answers it from
    the API server's own state (has the engine process died?) without a round trip to the engine, so an
    engine busy in a weight reload for many seconds, with a hand-over (pause, reload, resume) waiting behind
    it, answers it at once. Probed here every 0.25 s with a 1 s timeout, ten times stricter than the chart.
    (Readiness and startup are /health too: vLLM listens only once the model is loaded and warmed up.)"""
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=1.0) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    code = c.get(base.url + "/health").status_code
                    if code != 200:
                        failures.append(f"HTTP {code}")
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                latencies.append(time.monotonic() - t0)
                time.sleep(0.25)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    cfg = _config(make_config, tmp_path, base, vllm_model, vllm={"sync_timeout_s": 60})
    engine, _, _ = _engine(cfg)
    try:
        # The engine blocked in a weight reload for 6 s (the slow-reload worker extension), and the trainer's
        # real hand-over queued behind it: its /pause waits until the engine is free.
        def slow_reload() -> None:
            httpx.post(base.url + "/collective_rpc", json={"method": "slow_reload_weights", "kwargs": {
                "weights_path": str(vllm_model), "delay_s": "6"}}, timeout=60)  # fmt: skip

        blocker = threading.Thread(target=slow_reload)
        blocker.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        engine.sync_weights(1)
        hand_over = time.monotonic() - t0
        blocker.join(timeout=60)
    finally:
        engine.close()
        stop.set()
        prober.join(timeout=5)
    assert hand_over > 4.0 and _weight_version(base) == "v1", hand_over
    assert not failures, failures
    assert len(latencies) > 10 and max(latencies) < 0.5, latencies
    print(
        f"hand-over {hand_over:.1f}s behind a blocked engine; /health answered {len(latencies)} probes, "
        f"slowest {max(latencies) * 1000:.0f} ms"
    )


def test_launcher_run_starts_vllm_and_a_server_killed_mid_run_stops_the_run_naming_it(
    make_config, tmp_path, vllm_model
) -> None:
    """`rollout.vllm.launch: true`: `launcher run` starts the real server (USERLOOP_VLLM_PYTHON) as its child,
    with the sidecar's flags; killed after step 2, the run stops with an error naming its URL, exit 1, the
    step-2 checkpoint complete, and the launcher leaves nothing running."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = make_config("vl-launch", model__path=str(vllm_model), rollout__engine="vllm", algorithm__max_steps=50,
                       rollout__vllm={"launch": True, "url": url, "startup_timeout_s": 240},
                       checkpoint__save_every_steps=2, eval__every_steps=None)  # fmt: skip
    env = dict(os.environ, USERLOOP_VLLM_PYTHON=PYTHON, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(path)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    server_pid = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):  # step 2 is checkpointed (background save started at its end)
                server_pid = int(next(p for p in Path("/proc").iterdir() if p.name.isdigit()
                                      and _is_server(p, port)).name)  # fmt: skip
                os.kill(server_pid, signal.SIGKILL)
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert f"vLLM server ready at {url}" in out, out[-3000:]
    assert (
        "--host 127.0.0.1" in out and f"--port {port}" in out and "--logprobs-mode processed_logprobs" in out
    )
    assert server_pid is not None, out[-3000:]
    assert proc.returncode == EXIT_FAILED, out[-3000:]
    error = re.search(rf"^Error: rollout\.vllm\.url {re.escape(url)}: .*$", out, re.M)
    assert error, out[-3000:]
    print(error.group(0))
    ckpts = tmp_path / "runs/vl-launch/checkpoints"
    assert (ckpts / "step_2/manifest.json").is_file(), sorted(p.name for p in ckpts.iterdir())
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def _is_server(proc_dir: Path, port: int) -> bool:
    try:
        cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"vllm.entrypoints.openai.api_server" in cmd and str(port).encode() in cmd
