"""PPO with a critic on the tiny model: learning, the critic's checkpoint, exact resume, GAE, config checks.

Runs use ``configs/ppo_single_turn.yaml`` (the single-turn quickstart task, "The letter after c" -> "d", one
token, trained with PPO); learning is judged on the fifths of the steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from trainer import api, checkpoint
from trainer.config import load_config, parse_config
from trainer.critic import gae, load_critic, token_rewards, whiten
from trainer.errors import UserError

PPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ppo_single_turn.yaml"


@pytest.fixture
def ppo_config(tmp_path: Path, tiny_model: Path):
    """``configs/ppo_single_turn.yaml`` pointed at ``tmp_path``, with dotted-key ``changes``; returns its path."""

    def make(name: str, **changes) -> Path:
        raw = yaml.safe_load(PPO_CONFIG.read_text())
        raw.update(name=name, output_dir=str(tmp_path / "runs" / "{name}"))
        raw["model"] = {"path": str(tiny_model)}
        raw["data"]["train"]["path"] = str(tmp_path / "data" / "train.jsonl")
        raw["data"]["val"]["path"] = str(tmp_path / "data" / "val.jsonl")
        raw["eval"] = {}
        raw["logging"]["plots"] = False
        raw["checkpoint"]["save_every_steps"] = None
        for key, value in changes.items():
            node = raw
            *parents, leaf = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def _fifths(rows: list[dict], key: str) -> list[float]:
    k = len(rows) // 5
    return [sum(r[key] for r in rows[i * k : (i + 1) * k]) / k for i in range(5)]


def test_ppo_value_loss_falls_and_reward_rises(ppo_config) -> None:
    """The critic starts at 0 on a task whose reward starts at 0: its loss first grows with the reward's variance,
    then falls as the policy converges and the critic learns which prompts it now answers right."""
    cfg = load_config(ppo_config("ppo"))  # 120 steps, lr 4e-3, batch 16 x 16 episodes
    result = api.train(cfg)
    rows = _metrics(cfg)
    reward, value_loss = _fifths(rows, "reward/mean"), _fifths(rows, "loss/value")
    assert reward[-1] > reward[0] + 0.4, reward
    assert value_loss[-1] < 0.6 * max(value_loss), value_loss
    assert _fifths(rows, "value/explained_variance")[-1] > 0.2  # better than predicting the mean reward
    log = (Path(cfg.output_dir) / "logs" / "train.log").read_text()
    assert re.search(r"step 120/120 epoch \d+/\d+ \| PL:-?\d+\.\d{4} VL:\d+\.\d{4} R:\d\.\d\d A:-?\d+\.\d\d "
                     r"E:\d\.\d{3} LR:\d\.\d\de-\d\d", log), log[-2000:]  # fmt: skip
    critic = Path(result.last_checkpoint) / "critic"
    assert (critic / "model.safetensors").is_file() and (critic / "training_state.pt").is_file()


@pytest.mark.parametrize("lora", [False, True])
def test_critic_checkpoint_round_trip(ppo_config, monkeypatch, lora: bool) -> None:
    """The critic and its optimizer are in step_N/critic/, covered by the manifest, and reload bit-identical."""
    seen: dict = {}
    real_save = checkpoint.save

    def spy(*args, **kwargs):
        model, state = kwargs.get("extra_models", args[7] if len(args) > 7 else {})["critic"]
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["optimizer"] = state
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", spy)
    # The LoRA run also takes the loop's other paths: two passes per batch (old log-probs and values kept for the
    # clips), micro-batches, the KL to the base (adapter off) and the entropy bonus.
    changes = {"model__lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, "algorithm__updates_per_batch": 2,
               "algorithm__grad_accum": 2, "algorithm__kl_coef": 0.05, "algorithm__entropy_coef": 0.01} if lora else {}  # fmt: skip
    cfg = load_config(ppo_config("round-trip", algorithm__max_steps=3, algorithm__group_size=4, **changes))
    ckpt = Path(api.train(cfg).last_checkpoint)
    if lora:
        assert _metrics(cfg)[-1]["kl"] > 0 and _metrics(cfg)[-1]["loss/value"] > 0
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    weights = "critic/adapter_model.safetensors" if lora else "critic/model.safetensors"
    assert {weights, "critic/training_state.pt"} <= set(manifest)
    assert checkpoint.verify_manifest(ckpt) is None

    critic = load_critic(cfg, torch.device("cpu"), ckpt / "critic")
    reloaded = critic.state_dict()
    # LoRA: compare what the adapter holds (LoRA matrices and the value head); the frozen base is model.path's.
    trained = {k for k in seen["weights"] if not lora or "lora_" in k or "modules_to_save" in k}
    assert trained and all(torch.equal(seen["weights"][k], reloaded[k]) for k in trained)
    state = torch.load(ckpt / "critic" / "training_state.pt", weights_only=False)
    assert state["param_groups"] == seen["optimizer"]["param_groups"]
    for i, moments in seen["optimizer"]["state"].items():
        assert all(torch.equal(v, state["state"][i][k]) for k, v in moments.items())

    (ckpt / weights).write_bytes(b"garbage")
    assert (
        checkpoint.verify_manifest(ckpt)
        == f"{weights} has 7 bytes, manifest says {manifest[weights]['size']}"
    )


def test_ppo_resume_continues_the_same_value_estimates(ppo_config) -> None:
    """Stopped at step 4 and resumed to 8 == 8 steps straight, value loss and value estimates included."""
    straight = load_config(ppo_config("straight", algorithm__max_steps=8, algorithm__group_size=4,
                                      checkpoint__save_every_steps=4))  # fmt: skip
    api.train(straight)
    path = ppo_config(
        "resumed", algorithm__max_steps=4, algorithm__group_size=4, checkpoint__save_every_steps=4
    )
    api.train(load_config(path))
    resumed = load_config(path, ["algorithm.max_steps=8"])
    api.train(resumed)
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("reward/mean", "loss/policy", "loss/value", "value/mean", "adv/mean", "grad_norm",
                "critic/grad_norm"):  # fmt: skip
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key


def test_gae_runs_over_the_agents_tokens_only() -> None:
    # One sequence: target positions 0..5; agent tokens at 1, 2 (turn 1) and 4, 5 (turn 2); 3 is an observation.
    mask = torch.tensor([[0.0, 1, 1, 0, 1, 1]])
    values = torch.tensor([[9.0, 0.5, 0.5, 9.0, 0.25, 0.25]])  # 9: context positions, never read
    # Turn rewards on each turn's last token: spans are token ranges, token j is target position j-1.
    rewards = token_rewards([[(2, 4), (5, 7)]], [[1.0, 2.0]], (1, 6), torch.device("cpu"))
    assert rewards.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 2.0]]
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: advantage = reward-to-go over agent tokens minus the value; the observation is skipped.
    assert returns.tolist() == [[0.0, 3.0, 3.0, 0.0, 2.0, 2.0]]
    assert adv.tolist() == [[0.0, 2.5, 2.5, 0.0, 1.75, 1.75]]
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)  # one-step TD errors, discounted per agent token
    assert adv.tolist() == [[0.0, 0.5 * 0.5 - 0.5, 1.0 + 0.5 * 0.25 - 0.5, 0.0, 0.5 * 0.25 - 0.25, 1.75]]
    white = whiten(adv, mask)
    assert float((white * mask).sum()) == pytest.approx(0.0, abs=1e-6) and float(white[0, 3]) == 0.0


BASE = {
    "name": "x",
    "model": {"path": "m"},
    "data": {"train": {"path": "t.jsonl"}},
    "rewards": [{"type": "accuracy"}],
}


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        (
            {"name": "grpo", "critic_lr": 1e-5},
            "algorithm.critic_lr is a PPO setting but algorithm.name is grpo",
        ),
        (
            {"name": "sft", "lam": 0.9, "value_clip": 0.1},
            "algorithm.lam is a PPO setting but algorithm.name is sft",
        ),
        ({"name": "ppo", "turn_gamma": 0.9}, "turn_gamma is not used by PPO"),
        ({"name": "sft", "advantage": "turn"}, "algorithm.advantage applies to GRPO and PPO, not sft"),
    ],
)
def test_settings_of_another_algorithm_are_refused(algorithm: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config({**BASE, "algorithm": algorithm})


def test_a_dumped_config_with_every_default_reloads() -> None:
    # Checkpoints and the pod's ConfigMap carry every field, PPO's defaults included: they must load as GRPO.
    from trainer.config import dump_config

    cfg = parse_config({**BASE, "algorithm": {"name": "grpo"}})
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again.algorithm == cfg.algorithm


def test_ppo_accepts_one_episode_per_prompt_and_refuses_greedy_sampling() -> None:
    cfg = parse_config({**BASE, "algorithm": {"name": "ppo", "group_size": 1}})
    assert cfg.algorithm.group_size == 1 and cfg.algorithm.critic_lr is None
    with pytest.raises(UserError, match="PPO would never try another action"):
        parse_config({**BASE, "algorithm": {"name": "ppo"}, "rollout": {"temperature": 0}})


def test_ppo_with_turn_rewards_learns_the_multi_turn_quiz(tmp_path: Path, tiny_model: Path) -> None:
    """Multi-turn PPO: each quiz turn's reward on that turn's last token, GAE across the observations between."""
    data = tmp_path / "quiz.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Say a", "answer": "a"}) + "\n" for _ in range(64)))
    cfg = parse_config({
        "name": "ppo-quiz", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model)},
        "algorithm": {"name": "ppo", "lr": 2e-3, "batch_size": 8, "group_size": 8, "max_steps": 30, "epochs": 100,
                      "advantage": "turn", "scheduler": {"warmup_steps": 5}},
        "data": {"train": {"path": str(data)}},
        "environment": {"name": "quiz", "max_turns": 3, "max_episode_tokens": 1024},
        "rollout": {"max_new_tokens": 1},
        "logging": {"plots": False},
    })  # fmt: skip
    api.train(cfg)
    rows = _metrics(cfg)
    reward = _fifths(rows, "reward/mean")
    assert reward[-1] > reward[0] + 0.3, reward
    assert all(r["episodes/turns_mean"] == 3 for r in rows)


def test_two_processes_train_one_policy_and_one_critic(ppo_config) -> None:
    """DDP: each process rolls out its share; the critic is all-reduced like the policy, so both stay in sync."""
    import subprocess
    import sys

    path = ppo_config("ddp", algorithm__max_steps=3, algorithm__group_size=4)
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "replicas in sync: 2 processes hold the same weights" in proc.stdout
    )  # policy and critic parameters
    cfg = load_config(path)
    assert [r["step"] for r in _metrics(cfg)] == [1, 2, 3]
    assert (Path(cfg.output_dir) / "checkpoints" / "step_3" / "critic" / "model.safetensors").is_file()
