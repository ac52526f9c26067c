"""``trainer.model.Prefetch``: the weight files read into the page cache in the background while a model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import model as model_mod
from trainer.model import Prefetch


def test_the_spans_cover_every_byte_of_every_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Prefetch, "BLOCK", 100)  # spans of 800 bytes
    sizes = {"a.safetensors": 2_000, "b.safetensors": 800, "c.safetensors": 1}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    spans = Prefetch.ranges(sorted(tmp_path.glob("*.safetensors")))
    for name, size in sizes.items():
        mine = [(s, e) for f, s, e in spans if f.name == name]
        assert mine[0][0] == 0 and mine[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:], strict=False))  # contiguous, no overlap
        assert all(e - s <= 800 for s, e in mine)


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every ``readinto`` of the prefetch threads, in bytes."""
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, fh) -> None:
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

        def seek(self, pos: int) -> None:
            self.fh.seek(pos)

        def readinto(self, buf) -> int:
            n = self.fh.readinto(buf)
            read.append(n)
            return n

    monkeypatch.setattr(
        model_mod, "open", lambda path, *a, **k: Counting(real_open(path, *a, **k)), raising=False
    )
    monkeypatch.setattr(model_mod, "_available_memory", lambda: 1 << 40)
    return read


def test_reads_in_the_background_and_is_skipped_when_memory_is_short(tmp_path: Path, bytes_read: list[int],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    Prefetch(tmp_path).join()
    assert sum(bytes_read) == 10_000

    bytes_read.clear()
    monkeypatch.setattr(model_mod, "_available_memory", lambda: 15_000)  # the file would take > half of it
    p = Prefetch(tmp_path)
    assert not p._threads
    p.join()
    assert not bytes_read
    assert not Prefetch(tmp_path / "missing")._threads  # a hub id: nothing to read


def test_only_the_files_transformers_loads(tmp_path: Path, bytes_read: list[int]) -> None:
    """A repository's second copy of the weights (``consolidated.safetensors``) is not read; shards are."""
    import json

    (tmp_path / "consolidated.safetensors").write_bytes(b"x" * 5_000)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 400)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors"}}))  # fmt: skip
    Prefetch(tmp_path).join()
    assert sum(bytes_read) == 700


def test_ranks_of_one_node_split_the_reading(tmp_path: Path, bytes_read: list[int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(Prefetch, "BLOCK", 100)  # spans of 800 bytes: 3 spans for 2,000 bytes
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    Prefetch(tmp_path).join()
    assert sum(bytes_read) == 800  # the second span only; rank 0 reads the first and third


def test_stop_ends_the_reading_early_and_a_failed_load_does_not_wait_for_it(tmp_path: Path,
                                                                           bytes_read: list[int]) -> None:  # fmt: skip
    from trainer.errors import UserError

    with open(tmp_path / "model.safetensors", "wb") as f:  # sparse: 8 GiB on disk in no time
        f.truncate(8 << 30)
    p = Prefetch(tmp_path)
    p.stop()
    assert not any(t.is_alive() for t in p._threads)
    assert sum(bytes_read) < 1 << 30  # at most a block or so per thread after the stop
    bytes_read.clear()
    with pytest.raises(UserError, match="cannot load a causal LM"):  # no config.json: fails at once
        model_mod.from_pretrained(tmp_path, torch_float32())
    assert sum(bytes_read) < 1 << 30  # the error did not wait for the 8 GiB to be read
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "nowhere")  # a dangling link (partial download)
    with pytest.raises(UserError, match="cannot load a causal LM"):
        model_mod.from_pretrained(tmp_path, torch_float32())


def torch_float32():
    import torch

    return torch.float32


def test_a_model_loads_the_same_with_the_prefetch(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a = model_mod.from_pretrained(tiny_model, torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
