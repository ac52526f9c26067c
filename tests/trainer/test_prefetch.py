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


def test_reads_in_the_background_and_is_skipped_when_memory_is_short(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10_000)
    read: list[int] = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        fh = real_open(path, *args, **kwargs)
        real_readinto = fh.readinto

        class Counting:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

            def seek(self, pos):
                fh.seek(pos)

            def readinto(self, buf):
                n = real_readinto(buf)
                read.append(n)
                return n

        return Counting()

    monkeypatch.setattr(model_mod, "open", counting_open, raising=False)
    monkeypatch.setattr(model_mod, "_available_memory", lambda: 1 << 30)
    p = Prefetch(tmp_path)
    p.join()
    assert sum(read) == 10_000

    read.clear()
    monkeypatch.setattr(model_mod, "_available_memory", lambda: 15_000)  # the file would take > half of it
    p = Prefetch(tmp_path)
    assert not p._threads
    p.join()
    assert not read
    assert not Prefetch(tmp_path / "missing")._threads  # a hub id or an adapter-less path: nothing to read


def test_a_model_loads_the_same_with_the_prefetch(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a = model_mod.from_pretrained(tiny_model, torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
