"""Background checkpoints (``checkpoint.BackgroundSaver``): the files are those of a synchronous save of the
state at the save point, whatever training does to the live weights meanwhile; a failed write is raised at
the join, and the earlier checkpoints stay."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import checkpoint
from trainer.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, seed=0)
    return path


def _state(model: torch.nn.Module) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    opt.step()
    return {"state": {"step": 1}, "optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state()}]}


def _hashes(path: Path) -> dict[str, str]:
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    return {rel: meta["sha256"] for rel, meta in files.items()}


@pytest.mark.parametrize("lora", [False, True])
def test_background_save_writes_the_state_of_the_save_point(tiny: Path, tmp_path: Path, lora: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tok = AutoTokenizer.from_pretrained(tiny)
    state = _state(model)
    sync = checkpoint.save(tmp_path / "sync", 1, model, tok, state, "a: 1\n", keep_last=2)

    saver = checkpoint.BackgroundSaver()
    saver.start(tmp_path / "bg", 1, model, tok, state, "a: 1\n", keep_last=2)
    with torch.no_grad():  # the next steps change the live weights and optimizer state while it writes
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
        for moments in state["optimizer"]["state"].values():
            moments["exp_avg"].add_(1.0)
    background = saver.wait()
    assert background is not None and background.name == "step_1"
    assert checkpoint.verify_manifest(background) is None
    # training_state.pt pickles the same values, but torch.save's zip records are not byte-stable across
    # separate tensors: compare what it holds, and every other file byte for byte.
    sync_hashes, bg_hashes = _hashes(sync), _hashes(background)
    assert sync_hashes.keys() == bg_hashes.keys()
    assert {k: v for k, v in sync_hashes.items() if k != "training_state.pt"} == {
        k: v for k, v in bg_hashes.items() if k != "training_state.pt"
    }
    a, b = checkpoint.load_state(sync), checkpoint.load_state(background)
    for idx, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], b["optimizer"]["state"][idx]["exp_avg"])


def test_failed_background_write_is_raised_at_the_join(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    state = _state(model)
    saver = checkpoint.BackgroundSaver()
    saver.start(tmp_path, 2, model, tok, state, "", keep_last=3)
    assert saver.wait() is not None

    def full_disk(tmp: Path, step: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_manifest", full_disk)
    saver.start(tmp_path, 4, model, tok, state, "", keep_last=3)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        saver.wait()
    assert "cannot write checkpoint step_4" in e.value.render()
    assert "earlier checkpoints are intact: ['step_2']" in (e.value.hint or "")
    assert not saver.in_flight and saver.wait() is None  # raised once, then nothing in flight
    assert [p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir()] == ["step_2"]
