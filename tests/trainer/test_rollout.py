"""Multi-turn rollouts: one token sequence per episode with the agent's tokens masked in, micro-batched
generation, invalid episodes excluded, and GRPO's advantages and collation over such sequences.

The policy here is a scripted ``RolloutEngine`` (a random tiny model never writes a tool call), so the
turns, their tokens and their rewards are known exactly; tokenizer, environment and rule judge are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import parse_config
from trainer.data import load_dataset
from trainer.engines.base import Completion, SamplingParams
from trainer.envs.base import aggregate
from trainer.envs.intentiongym_sample import write_sample
from trainer.grpo import collate, group_advantages
from trainer.model import load_tokenizer
from trainer.prompts import encode_chat
from trainer.rollout import EpisodeRunner, write_samples
from trainer.testing.scripted import ScriptedClient

QUESTIONS = [
    "What is your budget for the trip?",
    "Which dates will you travel?",
    "Who are your travel companions?",
]
PARAMS = SamplingParams(max_new_tokens=64, temperature=1.0)


def tool_call(question: str) -> str:
    return (
        "<tool_call>"
        + json.dumps({"name": "interact_with_env", "arguments": {"content": question}})
        + "</tool_call>"
    )


class ScriptedEngine:
    """Asks ``QUESTIONS[turn]``; records every batch it was given and the ids it generated."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.batches: list[int] = []
        self.generated: list[list[int]] = []

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        assert n == 1
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            turn = self.tokenizer.decode(p).count("<|im_start|>assistant") - 1
            text = tool_call(QUESTIONS[turn])
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            self.generated.append(ids)
            out.append([Completion(p, ids, text, finished=True)])
        return out

    def sync_weights(self, step: int) -> None:
        return None


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Rows 0 and 8 are the "weekend trip" task: budget (importance 2), dates (3), companions (1), destination (3).
    return write_sample(tmp_path_factory.mktemp("ig"), train=9, test=2, seed=0)


def make_cfg(sample: dict[str, Path], tiny_model: Path, **env):
    raw = {
        "name": "rollout-test",
        "model": {"path": str(tiny_model)},
        "algorithm": {"name": "grpo", "batch_size": 2, "group_size": 2},
        "data": {"train": {"path": str(sample["train"])}, "max_prompt_tokens": 4096},
        "environment": {
            "name": "intentiongym",
            "intentions": str(sample["train_intentions"]),
            "judge_backend": "rule",
            "max_turns": 2,
            **env,
        },  # fmt: skip
        "user_simulator": {"backend": "local", "path": str(tiny_model)},
    }
    return parse_config(raw)


def rows_of(cfg, indices: list[int]) -> list[tuple[int, dict, list[int]]]:
    rows = load_dataset(cfg.data, "train").rows
    return [(i, rows[i], []) for i in indices]


def test_an_episode_is_one_sequence_with_only_the_agents_tokens_trained(sample, tiny_model) -> None:
    cfg = make_cfg(sample, tiny_model)
    tok = load_tokenizer(tiny_model)
    engine = ScriptedEngine(tok)
    user = ScriptedClient(lambda m: "About 500 dollars.", role="user_simulator")
    runner = EpisodeRunner(cfg, engine, tok, [], "unused", clients={"user_simulator": user})
    try:
        trajectories = runner.rollout(rows_of(cfg, [0]), 2, PARAMS)
    finally:
        runner.close()
    assert len(trajectories) == 2
    for t in trajectories:
        # Turn 1 asks about the budget (importance 2: 0.7), turn 2 about the dates (3: 1.0); the score is the mean.
        assert t.invalid is None and t.turns == 2 and t.reward == pytest.approx(0.85)
        assert t.parts["intentiongym"] == pytest.approx(0.85)
        assert len(t.token_ids) == len(t.loss_mask)
        trained = [i for i, m in zip(t.token_ids, t.loss_mask, strict=True) if m]
        assert trained == engine.generated[0] + engine.generated[-1]  # the generated ids, verbatim
        assert t.agent_tokens == len(trained)
        prompt = encode_chat(tok, t.messages[:2], runner.envs["train"].start(rows_of(cfg, [0])[0][1]).tools)
        assert t.token_ids[: len(prompt)] == prompt and not any(t.loss_mask[: len(prompt)])
        context = tok.decode(
            [i for i, m in zip(t.token_ids, t.loss_mask, strict=True) if not m][len(prompt) :]
        )
        assert "About 500 dollars." in context and "<|im_start|>assistant" in context
        assert [m["role"] for m in t.messages[2:]] == ["assistant", "tool", "assistant"]
    assert len(user.calls) == 2  # one user reply per episode: the last turn's would never be read


def test_concurrent_episodes_share_generate_calls(sample, tiny_model) -> None:
    cfg = make_cfg(sample, tiny_model)
    tok = load_tokenizer(tiny_model)
    engine = ScriptedEngine(tok)
    user = ScriptedClient(lambda m: "Next weekend.", role="user_simulator", latency_s=0.01)
    runner = EpisodeRunner(cfg, engine, tok, [], "unused", clients={"user_simulator": user})
    try:
        trajectories = runner.rollout(rows_of(cfg, [0, 1, 2, 3]), 2, PARAMS)
        metrics = runner.step_metrics(trajectories)
    finally:
        runner.close()
    assert engine.batches[0] == 8  # every episode's first turn in one batch
    assert sum(engine.batches) == sum(t.turns for t in trajectories)
    assert len(engine.batches) < sum(engine.batches)
    assert metrics["time/engine_idle_s"] >= 0 and metrics["time/engine_busy_s"] > 0
    assert metrics["episodes/invalid"] == 0 and metrics["episodes/turns_mean"] > 1
    assert metrics["api/calls"] == user.stats.snapshot()["api/calls"] > 0


def test_a_failed_user_call_makes_the_episode_invalid_never_zero(sample, tiny_model) -> None:
    cfg = make_cfg(sample, tiny_model)
    tok = load_tokenizer(tiny_model)
    user = ScriptedClient(lambda m: ScriptedClient.FAIL, role="user_simulator")
    runner = EpisodeRunner(cfg, ScriptedEngine(tok), tok, [], "unused", clients={"user_simulator": user})
    try:
        trajectories = runner.rollout(rows_of(cfg, [0, 1]), 2, PARAMS)
        metrics = runner.step_metrics(trajectories)
    finally:
        runner.close()
    assert all(t.reward is None and "scripted failure" in (t.invalid or "") for t in trajectories)
    assert metrics["episodes/invalid"] == 4 and metrics["episodes/invalid_rate"] == 1.0
    assert group_advantages([t.reward for t in trajectories], 2) == [None] * 4


def test_llm_judge_reward_adds_to_single_turn_rewards_and_can_invalidate(sample, tiny_model) -> None:
    raw = {
        "name": "judge-test",
        "model": {"path": str(tiny_model)},
        "algorithm": {"name": "grpo", "batch_size": 2, "group_size": 2},
        "data": {"train": {"path": str(sample["train"])}, "max_prompt_tokens": 4096},
        "rewards": [
            {"type": "format", "pattern": ".*interact_with_env.*"},
            {"type": "llm_judge", "rubric": "Rate {completion}", "weight": 0.5},
        ],  # fmt: skip
        "judge": {"model": "scripted"},
    }
    cfg = parse_config(raw)
    tok = load_tokenizer(tiny_model)
    from trainer.rewards import build_rewards

    judge = ScriptedClient(['{"score": 8}', "no idea"], role="judge")
    runner = EpisodeRunner(cfg, ScriptedEngine(tok), tok, build_rewards(cfg.rewards), "unused",
                           clients={"judge": judge})  # fmt: skip
    try:
        rows = [(0, load_dataset(cfg.data, "train").rows[0], [1, 2, 3])]
        good, bad = runner.rollout(rows, 2, PARAMS)
    finally:
        runner.close()
    assert good.reward == pytest.approx(1.0 + 0.5 * 0.8) and good.parts == {"format": 1.0, "llm_judge": 0.8}
    assert bad.reward is None and bad.invalid and bad.invalid.startswith("llm_judge: judge (scripted)")
    # What episodes.jsonl shows of each verdict: the parsed score, and the reply it came from.
    assert good.judges == {
        "llm_judge": {"score": 8.0, "value": 0.8, "invalid": None, "reply": '{"score": 8}'}
    }
    assert bad.judges["llm_judge"]["reply"] == "no idea" and bad.judges["llm_judge"]["value"] is None
    assert bad.judges["llm_judge"]["invalid"] == bad.invalid.removeprefix("llm_judge: ")


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([1.0, 0.0, 1.0, 0.0], [1.0, -1.0, 1.0, -1.0]),
        ([0.5, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, -1.0]),  # two groups of two
        ([1.0, None, 0.0, None], [1.0, None, -1.0, None]),  # normalised over the valid members
        ([1.0, None, None, None], [None, None, None, None]),  # fewer than two valid: the group is dropped
    ],
)
def test_group_advantages_over_valid_members(rewards, expected) -> None:
    group = 2 if len(rewards) == 4 and rewards[1] == 0.5 else 4
    got = group_advantages(rewards, group)
    assert [None if g is None else pytest.approx(g) for g in got] == expected


def test_collate_shifts_precomputed_masks_onto_targets() -> None:
    batch = collate([[5, 6, 7, 8, 9], [5, 6]], [[0, 0, 1, 0, 1], [0, 1]], [1.0, -1.0], 0, "cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


# The parts of Qwen3's chat template that matter between turns, condensed: tool results go back inside a
# user turn wrapped in <tool_response>, and an assistant turn after the last user query keeps its think
# block only when it is the last message (so re-rendering a conversation is not a growing prefix).
QWEN3_LIKE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- set i = messages|length - 1 - loop.index0 %}"
    "{%- if m.role == 'user' and ns.last_query_index == messages|length - 1 %}{%- set ns.last_query_index = i %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or m.role == 'system' %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + m.content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("finished", [True, False])
def test_observation_tokens_follow_a_qwen3_style_template(tiny_model, finished: bool) -> None:
    from trainer.prompts import TurnTemplate

    tok = load_tokenizer(tiny_model)
    tok.chat_template = QWEN3_LIKE
    # A turn cut at max_new_tokens, or stopped on <|endoftext|>, did not close itself: the template's end is added.
    agent = [5, 6, tok.eos_token_id] if finished else [5, 6, tok.pad_token_id]
    ids = TurnTemplate(tok).observation_ids([{"role": "tool", "content": "About 500 dollars."}], agent)
    expected = "\n<|im_start|>user\n<tool_response>\nAbout 500 dollars.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == ("" if finished else "<|im_end|>") + expected


def test_api_counters_continue_from_the_last_logged_step(sample, tiny_model) -> None:
    cfg = make_cfg(sample, tiny_model)
    tok = load_tokenizer(tiny_model)
    user = ScriptedClient(lambda m: "ok", role="user_simulator")
    runner = EpisodeRunner(cfg, ScriptedEngine(tok), tok, [], "unused", clients={"user_simulator": user})
    try:
        runner.restore_api_stats({"step": 7, "api/user_simulator/calls": 40.0, "api/user_simulator/cost": 1.5,
                                  "api/user_simulator/latency_p50_s": 0.3, "api/calls": 40.0})  # fmt: skip
    finally:
        runner.close()
    snap = user.stats.snapshot()
    assert snap["api/calls"] == 40 and snap["api/cost"] == 1.5


@pytest.mark.parametrize(("score", "expected"), [("mean", 0.85), ("sum", 1.7)])
def test_episode_records_show_each_turns_reward_verdict_and_author(sample, tiny_model, tmp_path, score,
                                                                    expected) -> None:  # fmt: skip
    """logs/episodes.jsonl: per-turn rewards that aggregate to the episode's score as configured, the judge's
    verdict per turn, and for each message who wrote it and (observations) what the model was shown."""
    cfg = make_cfg(sample, tiny_model, score=score)
    tok = load_tokenizer(tiny_model)
    user = ScriptedClient(lambda m: "About 500 dollars.", role="user_simulator")
    runner = EpisodeRunner(cfg, ScriptedEngine(tok), tok, [], "unused", clients={"user_simulator": user})
    try:
        trajectories = runner.rollout(rows_of(cfg, [0]), 2, PARAMS)
        metrics = runner.step_metrics(trajectories)
    finally:
        runner.close()
    assert metrics["local/user_simulator"] == 1.0  # user_simulator.backend: local, for the step line
    write_samples(tmp_path / "episodes.jsonl", 3, trajectories)
    records = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        assert {"step", "reward", "invalid", "turns", "parts", "messages"} <= set(rec)  # the keys kept
        assert rec["env"] == {"name": "intentiongym", "score": score, "id": rec["env"]["id"], "covered": 2,
                              "details": 4}  # fmt: skip
        log = rec["turn_log"]
        assert [t["turn"] for t in log] == [1, 2] and [t["reward"] for t in log] == pytest.approx([0.7, 1.0])
        scored = [t["reward"] for t in log if t["reward"] is not None]
        assert aggregate(scored, rec["env"]["score"]) == pytest.approx(rec["parts"]["intentiongym"])
        assert rec["reward"] == pytest.approx(expected) == rec["parts"]["intentiongym"]
        assert sum(t["credit"] for t in log) == pytest.approx(expected if score == "sum" else 1.7)
        assert [t["question"] for t in log] == QUESTIONS[:2]
        assert [t["covered"] for t in log] == [["Budget for the trip"], ["Travel dates"]]
        assert all(t["judge"]["backend"] == "rule" and t["judge"]["matched"] for t in log)
        assert rec["judges"] == {}
        messages = rec["messages"]
        assert [(m["role"], m["from"]) for m in messages] == [
            ("system", "prompt"), ("user", "prompt"), ("assistant", "agent"), ("tool", "user_simulator"),
            ("assistant", "agent")]  # fmt: skip
        # The tiny model's template renders a tool message as its own turn; Qwen3's wraps it in a user turn.
        seen = "\n<|im_start|>tool\nAbout 500 dollars.<|im_end|>\n<|im_start|>assistant\n"
        assert messages[3]["seen_as"] == seen
        assert all("seen_as" not in m for i, m in enumerate(messages) if i != 3)


def test_episode_records_show_a_tool_reply_as_the_qwen3_template_renders_it(
    sample, tiny_model, tmp_path
) -> None:
    """The record's role is what the chat template got ("tool"); seen_as is what the model read: a user turn."""
    cfg = make_cfg(sample, tiny_model, text_action="ask")
    tok = load_tokenizer(tiny_model)
    tok.chat_template = QWEN3_LIKE
    user = ScriptedClient(lambda m: "About 500 dollars.", role="user_simulator")
    runner = EpisodeRunner(cfg, ScriptedEngine(tok), tok, [], "unused", clients={"user_simulator": user})
    try:
        trajectories = runner.rollout(rows_of(cfg, [0]), 1, PARAMS)
    finally:
        runner.close()
    write_samples(tmp_path / "episodes.jsonl", 1, trajectories)
    reply = json.loads((tmp_path / "episodes.jsonl").read_text())["messages"][3]
    assert reply["role"] == "tool" and reply["from"] == "user_simulator"
    assert (
        "<|im_start|>user\n<tool_response>\nAbout 500 dollars.\n</tool_response><|im_end|>"
        in reply["seen_as"]
    )
