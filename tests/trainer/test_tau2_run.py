"""The tau2 environment in the trainer: rollouts that keep simulator faults apart from API failures, and GRPO on
CPU that learns the bookshop policy's first rule (configs/quickstart_tau2.yaml).

The learning run is the quickstart's own config with the tiny model, the local tiny user simulator, one-token
turns and ``partial_reward: first_call``; only the user simulator's guidelines are shortened (its replies are
random text either way) to keep the test near a minute on two shared cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import api
from trainer.config import load_config, parse_config
from trainer.engines.base import Completion, SamplingParams
from trainer.envs.tau2_format import task_rows
from trainer.model import load_tokenizer
from trainer.rollout import EpisodeRunner
from trainer.testing.scripted import ScriptedClient

REPO = Path(__file__).resolve().parents[2]
TOOLS = "trainer.envs.domains.bookshop.tools:BookshopTools"


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# Task 0's gold trajectory, then the refund said and the agent's stop.
GOLD = [call("find_user", email="ada.park@example.com"), call("get_order", order_id="B1001"),
        call("cancel_order", order_id="B1001", reason="no longer needed"), "Done: 33 refunded. ###STOP###"]  # fmt: skip


class GoldEngine:
    """Plays ``GOLD``: turn k of an episode (counted from the assistant turns in its prompt) gets ``GOLD[k]``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        out = []
        for p in prompts:
            # Assistant turns in the prompt so far, less the opening greeting and the generation prompt.
            turn = self.tokenizer.decode(p).count("<|im_start|>assistant") - 2
            ids = self.tokenizer(GOLD[turn], add_special_tokens=False)["input_ids"] + [
                self.tokenizer.eos_token_id
            ]
            out.append([Completion(p, ids, GOLD[turn], finished=True)])
        return out

    def sync_weights(self, step: int) -> None:
        return None


def test_simulator_faults_are_excluded_and_counted_apart_from_api_failures(
    tmp_path: Path, tiny_model: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in task_rows(["0"], 1, 0)))
    cfg = parse_config({
        "name": "tau2-rollout", "model": {"path": str(tiny_model)},
        "algorithm": {"name": "grpo", "batch_size": 1, "group_size": 2}, "data": {"train": {"path": str(rows)}},
        "environment": {"name": "tau2", "domain_dir": "builtin:bookshop", "tools": TOOLS, "max_turns": 6},
        "user_simulator": {"backend": "local", "path": str(tiny_model)},
    })  # fmt: skip
    tok = load_tokenizer(tiny_model)
    # In call order, one per episode's opening: a customer, an API failure, an agent's voice, an early stop.
    user = ScriptedClient(["I want to cancel an order.", ScriptedClient.FAIL, "How can I help you today?",
                           "###STOP###"], role="user_simulator")  # fmt: skip
    runner = EpisodeRunner(cfg, GoldEngine(tok), tok, [], "unused", clients={"user_simulator": user})
    try:
        from trainer.data import load_dataset

        row = load_dataset(cfg.data, "train").rows[0]
        trajectories = runner.rollout([(0, row, [])], 4, SamplingParams(max_new_tokens=64, temperature=1.0))
        metrics = runner.step_metrics(trajectories)
    finally:
        runner.close()
    good, failed, role, stop = trajectories
    assert good.reward == 1.0 and good.turns == 4 and good.invalid is None and good.user_fault is None
    assert good.env_info["termination"] == "agent_stop" and good.env_info["breakdown"] == {
        "DB": 1.0,
        "COMMUNICATE": 1.0,
    }
    trained = tok.decode([i for i, m in zip(good.token_ids, good.loss_mask, strict=True) if m])
    assert trained.count("<tool_call>") == 3 and "###STOP###" in trained
    context = tok.decode([i for i, m in zip(good.token_ids, good.loss_mask, strict=True) if not m])
    assert '"status": "cancelled"' in context and "I want to cancel an order." in context
    for t in (failed, role, stop):  # excluded before any agent turn: nothing trained, the reason kept
        assert t.reward is None and t.turns == 0 and not any(t.loss_mask)
    assert "scripted failure" in (failed.invalid or "") and failed.user_fault is None
    assert (
        role.user_fault
        and role.user_fault.startswith("role_break")
        and role.invalid.startswith("user_fault:")
    )
    assert stop.user_fault and stop.user_fault.startswith("premature_stop")
    # Only the API failure counts toward the invalid rate that stops a run; the simulator's faults are their own.
    assert metrics["episodes/invalid"] == 1 and metrics["episodes/user_faults"] == 2
    assert metrics["episodes/tool_errors"] == 0


@pytest.mark.slow
def test_grpo_learns_to_authenticate_the_customer_first(tmp_path: Path, tiny_model: Path) -> None:
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text(
        "You are a customer. Follow the scenario. Write ###STOP### when your goal is reached.\n"
    )
    steps = 15
    cfg = load_config(REPO / "configs" / "quickstart_tau2.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model}", f"user_simulator.path={tiny_model}",
        f"data.train.path={tmp_path / 'data' / 'train.jsonl'}", f"data.val.path={tmp_path / 'data' / 'val.jsonl'}",
        f"environment.user_guidelines={guidelines}", f"algorithm.max_steps={steps}", "eval.every_steps=15",
        "logging.plots=false", "checkpoint.save_every_steps=null",
    ])  # fmt: skip
    result = api.train(cfg)
    assert result.status == "success" and result.steps == steps
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    # Untrained, ~1 episode in 20 calls find_user first; measured 0.04-0.05 -> 0.57-0.69 (steps 1-3 -> 13-15,
    # runs differ: the local simulator's batching follows timing); greedy evaluation 0.0 untrained.
    assert first < 0.15 and last > first + 0.3, (first, last)
    assert rows[-1]["eval/reward"] > 0.5  # greedy, on the test split's tasks
    for r in rows:
        assert r["episodes/invalid"] == 0 and r["episodes/turns_mean"] == 3 and "episodes/user_faults" in r
    records = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "episodes.jsonl").read_text().splitlines()
    ]
    # What the reward means here: 1 exactly when the agent's first tool call was find_user (tau2's own reward
    # stays 0, the conversations never reach a stop in 3 one-token turns).
    for rec in (rec for rec in records if rec["reward"] is not None):
        first_tool = next((t["tool"] for t in rec["turn_log"] if "tool" in t), None)
        assert rec["reward"] == float(first_tool == "find_user"), rec["turn_log"]
    assert all(rec["env"]["name"] == "tau2" and rec["env"]["task_id"] for rec in records)
