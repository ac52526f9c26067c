"""The IntentionGym loader on the generated sample: schemas, id matching, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trainer.config.multiturn import EnvironmentConfig
from trainer.config.schema import DatasetConfig
from trainer.data import read_records
from trainer.envs.intentiongym import IntentionGym, check_rows, load_intentions, row_id
from trainer.errors import UserError
from trainer.testing.scripted import ScriptedClient


def test_sample_follows_the_verl_schema(sample: dict[str, Path]) -> None:
    rows = pq.read_table(sample["train"]).to_pylist()
    assert len(rows) == 12
    row = rows[0]
    assert row["data_source"] == "interact_intention"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert "interact_with_env" in row["prompt"][0]["content"]
    assert set(row["reward_model"]) == {"category", "env_name", "ground_truth", "id", "style", "task"}
    assert row["reward_model"]["env_name"] == "IntentionGym"
    assert set(row["extra_info"]) == {"index", "need_tools_kwargs", "split", "tools_kwargs"}
    create = row["extra_info"]["tools_kwargs"]["interact_with_env"]["create_kwargs"]
    assert create == {k: row["reward_model"][k] for k in ("category", "env_name", "id", "task")}


def test_intentions_schema_and_matching(sample: dict[str, Path]) -> None:
    raw = json.loads(sample["train_intentions"].read_text())
    assert len(raw) > 12  # like upstream, the JSON holds more tasks than the rows use
    assert all(d["importance"] in ("1", "2", "3") for item in raw for d in item["missing_details"])
    intentions = load_intentions(sample["train_intentions"])
    rows = pq.read_table(sample["train"]).to_pylist()
    check_rows(rows, intentions, str(sample["train"]), str(sample["train_intentions"]))
    for row in rows:
        item = intentions[row_id(row)]
        assert row["reward_model"]["ground_truth"] == ", ".join(d.description for d in item.details)


def test_rows_from_the_trainer_loader_start_episodes(sample: dict[str, Path]) -> None:
    rows = read_records(DatasetConfig(path=str(sample["train"])))
    cfg = EnvironmentConfig(
        name="intentiongym", intentions=str(sample["train_intentions"]), judge_backend="rule"
    )
    env = IntentionGym.from_config(cfg, ScriptedClient(lambda m: "ok"))
    env.check_rows(rows, str(sample["train"]))
    episode = env.start({"prompt": rows[0]["prompt"], "row": rows[0]})  # the shape load_dataset yields
    assert episode.messages[0]["role"] == "system"
    assert episode.intention.id == rows[0]["reward_model"]["id"]
    assert env.start(rows[1]).intention.id == rows[1]["reward_model"]["id"]  # a raw record works too


def test_missing_id_names_the_id_and_the_file(sample: dict[str, Path]) -> None:
    rows = pq.read_table(sample["train"]).to_pylist()
    rows[3]["reward_model"]["id"] = "no-such-task"
    with pytest.raises(UserError) as err:
        check_rows(
            rows,
            load_intentions(sample["train_intentions"]),
            "train.parquet",
            str(sample["train_intentions"]),
        )
    message = err.value.render()
    assert "'no-such-task'" in message
    assert str(sample["train_intentions"]) in message
    assert err.value.hint


def test_test_rows_against_train_intentions_fail(sample: dict[str, Path]) -> None:
    rows = pq.read_table(sample["test"]).to_pylist()
    with pytest.raises(UserError, match="and 0 more|not found"):
        check_rows(rows, load_intentions(sample["train_intentions"]), "test.parquet", "train.json")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "invalid JSON"),
        ('{"id": 1}', "expected a list"),
        (
            '[{"id": "a", "task": "t", "missing_details": [{"description": "d", "importance": "5"}]}]',
            "importance",
        ),
        ('[{"id": "a", "task": "t", "missing_details": []}]', "missing_details is empty"),
        ('[{"task": "t", "missing_details": []}]', "'id'"),
        (
            '[{"id": "a", "task": "t", "missing_details": [{"description": "d", "importance": "1"}]},'
            ' {"id": "a", "task": "t", "missing_details": [{"description": "d", "importance": "1"}]}]',
            "duplicate id 'a'",
        ),
    ],
)
def test_bad_intention_files(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "intentions.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_intentions(path)
    assert problem in err.value.render()
    assert str(path) in err.value.render()


def test_missing_intention_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="intention file not found"):
        load_intentions(tmp_path / "nope.json")


def test_seat_booking_tasks_fit_the_tiny_model_and_the_rule_judge(tmp_path: Path) -> None:
    """The quickstart's premise: verl-format rows, and every option of every detail is one token of the tiny
    vocabulary that the rule judge maps to exactly that detail (so a one-token question can score)."""
    from trainer.envs.intentiongym import rule_covered
    from trainer.envs.intentiongym_sample import SEAT_DETAILS, write_seat_task
    from trainer.tiny import build_tokenizer

    paths = {"train": tmp_path / "train.parquet", "val": tmp_path / "test.parquet",
             "train_intentions": tmp_path / "i.json", "val_intentions": tmp_path / "i.json"}  # fmt: skip
    write_seat_task(paths, {"train": 8, "val": 4})
    intentions = load_intentions(tmp_path / "i.json")  # both splits' tasks in the one shared file
    assert len(intentions) == 12
    for split, n in (("train", 8), ("val", 4)):
        rows = pq.read_table(paths[split]).to_pylist()
        assert len(rows) == n and {r["data_source"] for r in rows} == {"interact_intention"}
        check_rows(rows, intentions, str(paths[split]), str(paths["train_intentions"]))
    details = next(iter(intentions.values())).details
    assert sorted(d.description for d in details) == sorted(d[0] for d in SEAT_DETAILS)
    tok = build_tokenizer()
    for i, d in enumerate(details):
        for option in d.options:
            for text in (option, " " + option, option.upper()):  # "b", " b" and "B" are all single tokens
                assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
                assert rule_covered(text, details) == [i], (text, d.description)
    assert rule_covered("x", details) == [] and rule_covered(" letter", details) == []
    mtime = paths["train"].stat().st_mtime_ns
    write_seat_task(paths, {"train": 8, "val": 4})  # existing data is kept (a resumed run)
    assert paths["train"].stat().st_mtime_ns == mtime
