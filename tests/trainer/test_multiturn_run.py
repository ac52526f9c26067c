"""Multi-turn GRPO end to end on CPU: ``configs/intentiongym.yaml`` with local parts (no API at all).

The tiny model plays the agent, a local copy of it plays the user, the rule judge covers details, on
the generated IntentionGym sample. The tests that use a real OpenAI-compatible server are in
``tests/llm/test_intentiongym_run.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import api
from trainer.config import load_config
from trainer.envs.base import aggregate
from trainer.envs.intentiongym_sample import write_sample
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def local_overrides(tmp_path: Path, tiny_model: Path) -> list[str]:
    s = write_sample(tmp_path / "data", train=4, test=2, seed=0)
    return [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={tiny_model}",
        # The config's laptop profile (its header): the in-process engine, no GPU kept for an SGLang sidecar.
        "rollout.engine=hf",
        "cluster.rollout_gpus_per_node=0",
        "model.gradient_checkpointing=false",
        "algorithm.lr=1e-3",
        "algorithm.batch_size=2",
        "algorithm.group_size=2",
        "algorithm.grad_accum=2",
        "algorithm.max_steps=2",
        f"data.train.path={s['train']}",
        f"data.val.path={s['test']}",
        f"environment.intentions={s['train_intentions']}",
        f"environment.val_intentions={s['test_intentions']}",
        "environment.judge_backend=rule",
        "environment.max_turns=2",
        "environment.max_episode_tokens=1000",
        "user_simulator.backend=local",
        f"user_simulator.path={tiny_model}",
        "user_simulator.max_tokens=8",
        "judge=null",
        "rollout.max_new_tokens=16",
        "eval.every_epochs=1",
        "logging.plots=false",
    ]


def test_intentiongym_with_local_user_and_rule_judge(tmp_path: Path, tiny_model: Path) -> None:
    cfg = load_config(REPO / "configs" / "intentiongym.yaml", local_overrides(tmp_path, tiny_model))
    result = api.train(cfg)
    assert result.status == "success" and result.steps == 2  # 4 tasks / 2 per step
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["episodes/invalid"] == 0 and r["episodes/invalid_rate"] == 0
        assert r["episodes/turns_mean"] >= 1 and r["time/engine_idle_s"] >= 0
        assert "api/user_simulator/calls" in r and "reward/intentiongym" in r
    assert rows[-1]["eval/samples"] == 2 and "eval/reward" in rows[-1]
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "policy").is_dir()
    samples = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "episodes.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]  # two conversations per step, to read
    assert [m["role"] for m in samples[0]["messages"][:3]] == ["system", "user", "assistant"]
    for s in samples:  # each turn's reward and verdict; they make the episode's reward as configured
        assert s["env"]["score"] == "mean" and len(s["turn_log"]) == s["turns"] and s["judges"] == {}
        scored = [t["reward"] for t in s["turn_log"] if t["reward"] is not None]
        assert aggregate(scored, "mean") == pytest.approx(s["reward"]) == s["parts"]["intentiongym"]
        for t in s[
            "turn_log"
        ]:  # the random model rarely writes a tool call: its text ends the episode unscored
            assert t.get("ended_by_agent") or t.get("malformed") or t["judge"]["backend"] == "rule"
        agent = [m for m in s["messages"] if m["role"] == "assistant"]
        assert all(m["from"] == "agent" for m in agent) and len(agent) == s["turns"]
        assert all("seen_as" in m for m in s["messages"] if m["from"] in ("user_simulator", "environment"))
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert "step 2/2" in log and "invalid 0" in log
    assert "local user " in log and " api " not in log  # the local user simulator is no API
    # `launcher eval` plays the same episodes as the run's own evaluation (one per validation task).
    result = api.evaluate(cfg, tmp_path / "run" / "checkpoints" / "step_2")
    assert result.status == "success" and result.samples == 2 and result.accuracy is None
    assert result.metrics["eval/invalid"] == 0 and result.reward == rows[-1]["eval/reward"] == 0.0


def test_unknown_task_id_fails_before_the_model_loads(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    """A row whose reward_model.id is not in the intention JSON: a clear error, before any model is loaded."""
    import trainer.session as session_module

    overrides = local_overrides(tmp_path, tiny_model)
    intentions = next(o.split("=", 1)[1] for o in overrides if o.startswith("environment.intentions="))
    data = json.loads(Path(intentions).read_text())
    Path(intentions).write_text(json.dumps(data[1:]))  # drop the first task the training rows refer to

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data check")

    monkeypatch.setattr(session_module, "load_policy", must_not_load)
    cfg = load_config(REPO / "configs" / "intentiongym.yaml", overrides)
    with pytest.raises(UserError) as e:
        api.train(cfg)
    assert f"not found in {intentions}" in e.value.render(), e.value.render()
    assert not (tmp_path / "run" / "checkpoints").exists()
