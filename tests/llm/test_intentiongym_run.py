"""``launcher run configs/intentiongym.yaml`` against a real OpenAI-compatible server (``transformers serve``).

The config's API sections are pointed at the local server through the fault proxy; model and data at
the tiny model and the generated IntentionGym sample. The tiny policy never writes a tool call; with
``environment.text_action: ask`` (the first test) its plain-text questions go to the simulated user and
the coverage judge over the API, as a tool call would. The tiny served model cannot write the judges'
JSON (``{"covered": [...]}``, or ``{"score": x}`` for the ``llm_judge`` reward scored at an episode's end),
so every episode is invalid: counted, excluded, never scored 0. With ``max_invalid_rate: 1.0`` the run
finishes; with the default 0.2 it checkpoints and stops (exit 1) naming the endpoint and the errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.envs.intentiongym_sample import write_sample
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.serve import TransformersServer, free_port

REPO = Path(__file__).resolve().parents[2]
JUDGE = '[{type: llm_judge, rubric: "Did the assistant ask good questions? {conversation}", weight: 1.0}]'


def overrides(tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy) -> list[str]:
    s = write_sample(tmp_path / "data", train=4, test=2, seed=0)
    api = [f"api_base={proxy.url}/v1", f"model={server.model}", "api_key_env=null", "extra_body={}",
           "max_tokens=8", "retries=1", "backoff_s=0.01", "timeout_s=20"]  # fmt: skip
    return [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={tiny_model}",
        # The config's laptop profile (its header): the in-process engine, no GPU kept for an SGLang sidecar.
        "rollout.engine=hf",
        "cluster.rollout_gpus_per_node=0",
        "model.gradient_checkpointing=false",
        "algorithm.batch_size=2",
        "algorithm.group_size=2",
        "algorithm.grad_accum=2",
        "algorithm.max_steps=2",
        "user_simulator.invalid_window=4",  # the invalid-rate stop judges after the first step's 4 episodes
        f"data.train.path={s['train']}",
        f"data.val.path={s['test']}",
        f"environment.intentions={s['train_intentions']}",
        f"environment.val_intentions={s['test_intentions']}",
        "environment.max_turns=2",
        "environment.max_episode_tokens=1000",
        "rollout.max_new_tokens=8",
        "logging.plots=false",
        f"rewards={JUDGE}",
        *(f"user_simulator.{a}" for a in api),
        *(f"judge.{a}" for a in api),
    ]


def launcher_run(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher", "run", str(REPO / "configs" / "intentiongym.yaml")]
    for a in args:
        cmd += ["--set", a]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_launcher_runs_intentiongym_against_a_real_server(
    tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy
) -> None:
    ask = ["user_simulator.max_invalid_rate=1.0", "environment.text_action=ask", "judge.cache=false"]
    out = launcher_run([*overrides(tmp_path, tiny_model, server, proxy), *ask])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2]
    user_before = 0.0
    for step, r in enumerate(rows, 1):
        # Each episode ends invalid at its first judge call (the coverage judge of its first question, or the
        # llm_judge when both turns were malformed, e.g. empty): exactly one judge call per episode, cumulative.
        assert r["api/judge/calls"] == 4 * step and r["api/judge/failed"] == 4 * step
        # The user simulator answered the first question of every episode whose first reply was not malformed
        # (none is asked on the last turn), concurrently with that question's coverage judge.
        assert 1 <= r["api/user_simulator/calls"] - user_before <= 4, r["api/user_simulator/calls"]
        user_before = r["api/user_simulator/calls"]
        assert r["api/calls"] == r["api/judge/calls"] + r["api/user_simulator/calls"]
        assert r["api/user_simulator/latency_p50_s"] > 0 and r["api/user_simulator/prompt_tokens"] > 0
        assert r["episodes/invalid"] == 4 and r["episodes/invalid_rate"] == 1.0
        assert r["loss/policy"] == 0  # nothing was trained on a failure
        assert r["api/latency_p50_s"] > 0 and "time/engine_idle_s" in r
    last = rows[-1]
    assert f"invalid 4 (100%) api {last['api/calls']:.0f} calls" in out.stdout
    # Every call reached the real server through the proxy (retries of empty user replies included), after the
    # start-up check's one GET /models for the two roles (which share the endpoint).
    stats = proxy.stats()
    assert stats["models_requests"] == 1
    assert stats["forwarded"] == last["api/calls"] + last["api/retries"] + 1
    conversation = json.loads((tmp_path / "run" / "logs" / "episodes.jsonl").read_text().splitlines()[0])
    assert conversation["invalid"] and "judge" in conversation["invalid"], conversation


def test_too_many_invalid_episodes_checkpoint_and_stop_naming_the_endpoint(
    tmp_path: Path,
    tiny_model: Path,
    server: TransformersServer,
    proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trainer.__main__ import main

    args = ["--config", str(REPO / "configs" / "intentiongym.yaml")]
    for a in overrides(tmp_path, tiny_model, server, proxy):
        args += ["--set", a]
    assert main(args) == 1  # `python -m trainer`, in this process
    err = capsys.readouterr().err
    assert "Error: user_simulator.max_invalid_rate" in err
    assert f"judge (openai/{server.model} at {proxy.url}/v1)" in err
    assert "4 of the last 4 episodes were invalid" in err and "parse" in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "manifest.json").is_file()  # saved before stopping
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()


def test_spent_budget_checkpoints_and_stops_gracefully(
    tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy
) -> None:
    from trainer import api
    from trainer.config import load_config

    budget = [
        "user_simulator.max_invalid_rate=1.0",
        "judge.price_per_1k_prompt_tokens=1.0",
        "judge.budget=1e-9",
    ]
    cfg = load_config(
        REPO / "configs" / "intentiongym.yaml", [*overrides(tmp_path, tiny_model, server, proxy), *budget]
    )
    result = api.train(cfg)
    assert result.status == "success" and result.steps == 1  # of max_steps 2: stopped after the first
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "manifest.json").is_file()
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert f"API budget exceeded (judge (openai/{server.model} at {proxy.url}/v1)" in log


def test_a_dead_endpoint_stops_the_run_before_its_first_step(
    tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy
) -> None:
    """The tiny policy never calls the tool that reaches the user simulator and, with no ``llm_judge`` reward,
    nothing else calls the API: a dead ``api_base`` went unnoticed (0 calls, reward 0, exit 0; issue 12)."""
    port = free_port()
    dead = f"http://127.0.0.1:{port}/v1"
    args = [*overrides(tmp_path, tiny_model, server, proxy), "rewards=[]"]
    args += [f"user_simulator.api_base={dead}", f"judge.api_base={dead}"]
    out = launcher_run(args)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert (
        f"Error: user_simulator.api_base, judge.api_base: cannot reach {dead}: connection refused: "
        f"127.0.0.1:{port} (GET {dead}/models)"
    ) in out.stderr
    assert f"Hint: check that the server at {dead} runs" in out.stderr and "Traceback" not in out.stderr
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step ran
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_launcher_eval_checks_the_endpoints_too(
    tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    args = [*overrides(tmp_path, tiny_model, server, proxy), f"user_simulator.api_base={dead}"]
    cmd = [sys.executable, "-m", "launcher", "eval", str(REPO / "configs" / "intentiongym.yaml"),
           "--checkpoint", str(tiny_model), "--max-samples", "1"]  # fmt: skip
    for a in args:
        cmd += ["--set", a]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["status"] == "error"
    # Only the dead one: the judge's endpoint (the proxy) answers.
    assert result["message"].startswith(f"user_simulator.api_base: cannot reach {dead}: connection refused")
    assert proxy.stats()["models_requests"] == 1
