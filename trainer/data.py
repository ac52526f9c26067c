"""Datasets: JSONL or Parquet rows mapped onto our names (``prompt``/``messages``, ``response``, ``answer``).

``load_dataset`` returns plain dict rows: ``{"prompt": [...messages], "response": str | None,
"answer": str | None, "row": original}``. A ``prompt`` column may hold a string (becomes one user
message) or a list of chat messages (verl format). Torch-free, so ``launcher data`` stays light.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.schema import DataConfig, DatasetConfig
from trainer.errors import UserError

# Column names tried, in order, when the config does not map one of our names.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations"),
    "prompt": ("prompt", "input", "question", "instruction", "query"),
    "response": ("response", "output", "completion", "chosen"),
    "answer": ("answer", "ground_truth", "solution", "label"),
}


@dataclass
class Dataset:
    path: str
    format: str
    columns: dict[str, str]  # our name -> the file's column
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)


def infer_format(ds: DatasetConfig) -> str:
    if ds.format:
        return ds.format
    suffix = Path(ds.path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UserError(f"{ds.path}", f"cannot infer the format from the suffix {suffix!r}",
                    hint="set data.<split>.format to jsonl or parquet")  # fmt: skip


def read_records(ds: DatasetConfig, limit: int | None = None, split: str = "train") -> list[dict[str, Any]]:
    path = Path(ds.path)
    if not path.is_file():
        raise UserError(str(path), "file not found", hint="check data.train.path / data.val.path")
    fmt = infer_format(ds)
    if fmt == "parquet":
        return _read_parquet(path, limit)
    records: list[dict[str, Any]] = []
    broken: list[int] = []  # line numbers of skipped lines (skip_bad_lines)
    # Bytes, decoded per line: one torn or binary line must be reported (or skipped) by its number,
    # not surface as a UnicodeDecodeError from the middle of the file.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = _parse_line(raw)
            except ValueError as e:
                if not ds.skip_bad_lines:
                    raise UserError(
                        str(path),
                        f"line {lineno}: {e}",
                        hint=f"fix the line, or set data.{split}.skip_bad_lines: true to skip broken lines",
                    ) from None
                broken.append(lineno)
                continue
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if broken:
        print(f"warning: data.{split}: skipped {len(broken)} broken lines in {path} (first at line {broken[0]})",
              file=sys.stderr, flush=True)  # fmt: skip
    if broken and not records:
        raise UserError(str(path), f"the dataset has no rows: all {len(broken)} lines are broken")
    return records


def _parse_line(raw: bytes) -> dict[str, Any]:
    """One JSONL line as a dict; ValueError says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    return rec


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise UserError(
            str(path), "reading Parquet needs pyarrow", hint="pip install 'userloop[train]'"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for files that are not Parquet
        # pyarrow repeats the path ("Could not open Parquet input source '<path>': ..."); it leads already.
        detail = str(e).split(f"'{path}': ", 1)[-1]
        raise UserError(str(path), f"not a readable Parquet file: {detail}") from None
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def resolve_columns(ds: DatasetConfig, columns: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for ours, theirs in ds.fields.items():
        if theirs not in columns:
            raise UserError(
                f"data: {ds.path}", f"fields.{ours}: column {theirs!r} not found; columns: {columns}"
            )
        mapping[ours] = theirs
    for ours, candidates in CANDIDATES.items():
        if ours not in mapping:
            found = next((c for c in candidates if c in columns), None)
            if found:
                mapping[ours] = found
    if "prompt" not in mapping and "messages" not in mapping:
        raise UserError(
            f"data: {ds.path}",
            f"no prompt column: looked for {list(CANDIDATES['prompt'] + CANDIDATES['messages'])}; columns: {columns}",
            hint="map yours with data.<split>.fields.prompt: <column>",
        )
    return mapping


def load_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    ds: DatasetConfig | None = getattr(cfg, split)
    if ds is None:
        raise UserError(f"data.{split}", "not configured")
    records = read_records(ds, cfg.max_samples, split)
    if not records:
        raise UserError(str(ds.path), "the dataset has no rows")
    mapping = resolve_columns(ds, list(records[0].keys()))
    rows = [_map_row(rec, mapping, cfg.system_prompt, ds.path, i) for i, rec in enumerate(records)]
    return Dataset(path=ds.path, format=infer_format(ds), columns=mapping, rows=rows)


def _map_row(rec: dict, mapping: dict[str, str], system: str | None, path: str, index: int) -> dict[str, Any]:
    if "messages" in mapping and rec.get(mapping["messages"]) is not None:
        messages = _as_messages(rec[mapping["messages"]], path, index)
    else:
        messages = _as_messages(rec.get(mapping["prompt"]), path, index)
    response = rec.get(mapping["response"]) if "response" in mapping else None
    answer = rec.get(mapping["answer"]) if "answer" in mapping else None
    if messages and messages[-1]["role"] == "assistant" and len(messages) > 1:
        # A conversation that ends with the reply: the reply is the target, not part of the prompt (or
        # evaluation would show the model its own answer).
        *messages, last = messages
        response = last["content"] if response is None else response
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return {
        "prompt": messages,
        "response": None if response is None else str(response),
        "answer": None if answer is None else str(answer),
        "row": rec,
    }


def _as_messages(value: Any, path: str, index: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise UserError(
        str(path), f"row {index}: prompt must be a string or a list of {{role, content}} messages"
    )
