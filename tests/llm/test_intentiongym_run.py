"""``launcher run configs/intentiongym.yaml`` against a real OpenAI-compatible server (``transformers serve``).

The config's API sections are pointed at the local server through the fault proxy; model and data at
the tiny model and the generated IntentionGym sample. The tiny policy never writes a tool call, so
the API traffic comes from an ``llm_judge`` reward scored at every episode's end; the tiny served
model cannot write ``{"score": x}``, so every episode is invalid: counted, excluded, never scored 0.
With ``max_invalid_rate: 1.0`` the run finishes; with the default 0.2 it checkpoints and stops (exit 1)
naming the endpoint and the errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.envs.intentiongym_sample import write_sample
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.serve import TransformersServer

REPO = Path(__file__).resolve().parents[2]
JUDGE = '[{type: llm_judge, rubric: "Did the assistant ask good questions? {conversation}", weight: 1.0}]'


def overrides(tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy) -> list[str]:
    s = write_sample(tmp_path / "data", train=4, test=2, seed=0)
    api = [f"api_base={proxy.url}/v1", f"model={server.model}", "api_key_env=null", "extra_body={}",
           "max_tokens=8", "retries=1", "backoff_s=0.01", "timeout_s=20"]  # fmt: skip
    return [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={tiny_model}",
        "model.gradient_checkpointing=false",
        "algorithm.batch_size=4",
        "algorithm.group_size=4",  # 16 episodes: enough for the invalid-rate window to judge
        "algorithm.grad_accum=2",
        "algorithm.max_steps=1",
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
    out = launcher_run([*overrides(tmp_path, tiny_model, server, proxy), "user_simulator.max_invalid_rate=1.0"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    (last,) = rows
    assert last["api/calls"] >= 16 and last["api/judge/calls"] >= 16  # one judge call per episode
    assert last["episodes/invalid"] == 16 and last["episodes/invalid_rate"] == 1.0
    assert last["api/failed"] == 16 and last["loss/policy"] == 0  # nothing was trained on a failure
    assert "invalid 16 (100%)" in out.stdout and "api 16 calls 16 failed" in out.stdout
    assert proxy.stats()["forwarded"] >= 16


@pytest.mark.slow
def test_too_many_invalid_episodes_checkpoint_and_stop_naming_the_endpoint(
    tmp_path: Path, tiny_model: Path, server: TransformersServer, proxy: FaultProxy
) -> None:
    out = launcher_run([*overrides(tmp_path, tiny_model, server, proxy), "algorithm.max_steps=3"])
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Error: user_simulator.max_invalid_rate" in out.stderr
    assert f"judge (openai/{server.model} at {proxy.url}/v1)" in out.stderr
    assert "16 of the last 16 episodes were invalid" in out.stderr and "parse" in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "manifest.json").is_file()  # saved before stopping
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()
