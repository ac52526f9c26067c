"""Datasets: JSONL and Parquet, field mapping, chat messages, and clear errors for broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from launcher.cli import app
from trainer.config import parse_config
from trainer.data import load_dataset
from trainer.errors import UserError


def _cfg(path: Path, **dataset) -> object:
    return parse_config({
        "name": "t", "model": {"path": "m"}, "algorithm": {"name": "sft"},
        "data": {"train": {"path": str(path), **dataset}},
    }).data  # fmt: skip


def test_jsonl_with_field_mapping(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps({"input": f"q{i}", "output": f"a{i}", "gt": str(i)}) for i in range(3))
    )
    ds = load_dataset(_cfg(path, fields={"answer": "gt"}))
    assert ds.columns == {"answer": "gt", "prompt": "input", "response": "output"}
    assert ds.rows[1]["prompt"] == [{"role": "user", "content": "q1"}]
    assert ds.rows[1]["response"] == "a1" and ds.rows[1]["answer"] == "1"


def test_parquet_with_chat_prompts(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]]
    pq.write_table(pa.table({"prompt": prompts, "answer": ["x"]}), path)
    ds = load_dataset(_cfg(path))
    assert ds.format == "parquet"
    assert ds.rows[0]["prompt"][1] == {"role": "user", "content": "u"}


def test_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        load_dataset(_cfg(path))


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("hello")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load_dataset(_cfg(path))


def test_mapped_column_missing(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a"}\n')
    with pytest.raises(UserError, match="fields.prompt: column 'question' not found"):
        load_dataset(_cfg(path, fields={"prompt": "question"}))


def test_launcher_data_json(make_config) -> None:
    result = CliRunner().invoke(app, ["data", str(make_config()), "--output", "json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "success"
    assert out["rows"] == 512
    assert out["columns"]["prompt"] == "prompt"
    assert out["example"]["answer"]
