"""Training end to end on the tiny model: learning, checkpoints, resume, LoRA, eval, two processes.

Each run is a few seconds on 2 CPU cores. Learning tests assert that the reward (or loss) moves, by
comparing the first and last fifth of the steps, not just that parameters changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from trainer import api, checkpoint
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _metrics(cfg) -> list[dict]:
    lines = (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _fifths(rows: list[dict], key: str) -> tuple[float, float]:
    k = max(1, len(rows) // 5)
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return first, last


def test_grpo_reward_rises_full_finetune(make_config) -> None:
    cfg = load_config(make_config("grpo", algorithm__max_steps=120))
    result = api.train(cfg)
    assert result.status == "success" and result.steps == 120
    first, last = _fifths(_metrics(cfg), "reward/mean")
    assert last > first + 0.4, (first, last)
    ckpt = Path(result.last_checkpoint)
    assert {p.name for p in ckpt.iterdir()} >= {"policy", "training_state.pt", "config.yaml", "manifest.json"}
    # The saved policy is a plain HF model directory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    AutoTokenizer.from_pretrained(ckpt / "policy")
    assert sorted(p.name for p in (Path(cfg.output_dir) / "plots").iterdir()) == [
        "losses.png", "lr.png", "reward.png", "signals.png", "training_metrics.png"]  # fmt: skip


def test_grpo_with_lora_kl_and_entropy_saves_an_adapter(make_config) -> None:
    cfg = load_config(make_config(
        "lora", algorithm__max_steps=4, algorithm__kl_coef=0.05, algorithm__entropy_coef=0.01,
        algorithm__updates_per_batch=2, algorithm__grad_accum=2, algorithm__lr=5e-3,
        model__lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    ))  # fmt: skip
    result = api.train(cfg)
    rows = _metrics(cfg)
    assert all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0  # the adapter moved away from the base
    policy = Path(result.last_checkpoint) / "policy"
    assert (policy / "adapter_config.json").is_file() and (policy / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    PeftModel.from_pretrained(base, policy)


def test_full_finetune_with_kl_keeps_a_reference(make_config) -> None:
    cfg = load_config(make_config("fullkl", algorithm__max_steps=3, algorithm__kl_coef=0.1))
    api.train(cfg)
    assert _metrics(cfg)[-1]["kl"] > 0


def test_sft_loss_falls(make_config) -> None:
    cfg = load_config(make_config("sft", algorithm__name="sft", algorithm__max_steps=60, algorithm__lr=3e-3,
                                  checkpoint__save_every_steps=None))  # fmt: skip
    result = api.train(cfg)
    first, last = _fifths(_metrics(cfg), "loss/sft")
    assert last < 0.6 * first, (first, last)
    assert (Path(result.last_checkpoint) / "policy" / "model.safetensors").is_file()


def test_resume_continues_the_same_run_exactly(make_config) -> None:
    """Stopped at step 6 and resumed to 12 == 12 steps straight: data order, RNG and optimizer restored."""
    straight = load_config(make_config("straight", algorithm__max_steps=12, checkpoint__save_every_steps=6))
    api.train(straight)
    path = make_config("resumed", algorithm__max_steps=6, checkpoint__save_every_steps=6)
    api.train(load_config(path))
    resumed = load_config(path, ["algorithm.max_steps=12"])
    api.train(resumed)
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 13))  # continued, never restarted, no step twice
    for key in ("reward/mean", "loss/policy", "entropy", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key


def test_partial_and_damaged_checkpoints_are_ignored(make_config) -> None:
    path = make_config("partial", algorithm__max_steps=4, checkpoint__save_every_steps=2)
    cfg = load_config(path)
    api.train(cfg)
    root = checkpoint.checkpoints_dir(cfg.output_dir)
    # A save killed halfway: a temp dir, and a step dir without manifest (never produced by us, but be safe).
    shutil.copytree(root / "step_4", root / ".tmp-step_6-123")
    (root / "step_8").mkdir()
    (root / "step_8" / "training_state.pt").write_bytes(b"partial")
    assert checkpoint.latest(cfg.output_dir).name == "step_4"
    # A damaged newest checkpoint falls back to the previous one, with a warning.
    (root / "step_4" / "training_state.pt").write_bytes(b"garbage")
    assert checkpoint.latest(cfg.output_dir).name == "step_2"
    resumed = load_config(path, ["algorithm.max_steps=5"])
    api.train(resumed)
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3, 4, 5]
    assert not list(root.glob(".tmp-*"))


def test_resume_never_refuses_to_mix_runs(make_config) -> None:
    from trainer.errors import UserError

    path = make_config("never", algorithm__max_steps=2)
    api.train(load_config(path))
    with pytest.raises(UserError, match="holds 1 checkpoint"):
        api.train(load_config(path, ["checkpoint.resume=never"]))


def test_keep_last(make_config) -> None:
    cfg = load_config(make_config("keep", algorithm__max_steps=8, checkpoint__save_every_steps=2,
                                  checkpoint__keep_last=2))  # fmt: skip
    api.train(cfg)
    assert sorted(p.name for p in checkpoint.checkpoints_dir(cfg.output_dir).iterdir()) == [
        "step_6",
        "step_8",
    ]


def test_eval_prints_json(make_config) -> None:
    path = make_config("ev", algorithm__max_steps=2)
    result = api.train(load_config(path))
    runner = CliRunner()
    out = runner.invoke(
        app, ["eval", str(path), "--checkpoint", result.last_checkpoint, "--max-samples", "8"]
    )
    assert out.exit_code == 0, out.stdout
    data = json.loads(out.stdout)
    assert data["status"] == "success" and data["samples"] == 8 and 0 <= data["accuracy"] <= 1
    out = runner.invoke(app, ["eval", str(path), "--checkpoint", "/no/such/dir"])
    assert out.exit_code == 2
    assert json.loads(out.stdout) == {
        "status": "error",
        "message": "--checkpoint /no/such/dir: directory not found",
    }


def test_early_stopping(make_config) -> None:
    cfg = load_config(make_config(
        "es", algorithm__max_steps=40, algorithm__lr=1e-9, eval={"every_steps": 2, "max_samples": 8},
        algorithm__early_stopping={"metric": "eval/reward", "patience": 2},
    ))  # fmt: skip
    result = api.train(cfg)
    assert result.stopped_early and result.steps < 40


def test_two_processes_train_one_model(make_config) -> None:
    path = make_config("ddp", algorithm__max_steps=4, checkpoint__save_every_steps=2)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert "replicas in sync: 2 processes hold the same weights" in proc.stdout
    cfg = load_config(path)
    assert [r["step"] for r in _metrics(cfg)] == [1, 2, 3, 4]  # rank 0 alone writes metrics
    assert proc.stdout.count("step 4/4") == 1


def test_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(make_config, monkeypatch) -> None:
    """A disk that fills up mid-save (injected: tests run as root on a roomy disk) stops the run with a clear
    error; the half-written checkpoint is removed and the earlier ones stay loadable."""
    import errno

    real = checkpoint._write_manifest

    def write_manifest(tmp, step):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, step)

    monkeypatch.setattr(checkpoint, "_write_manifest", write_manifest)
    cfg = load_config(make_config("full", algorithm__max_steps=6, checkpoint__save_every_steps=2))
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        api.train(cfg)
    assert "cannot write checkpoint step_4: [Errno 28] No space left on device" in e.value.render()
    assert "earlier checkpoints are intact: ['step_2']" in e.value.hint
    assert e.value.exit_code == 1
    root = checkpoint.checkpoints_dir(cfg.output_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert checkpoint.latest(cfg.output_dir).name == "step_2"


def test_grpo_starts_from_an_sft_lora_adapter(make_config, tmp_path) -> None:
    """SFT (LoRA) then GRPO from its policy/: GRPO's starting point is the SFT model, not the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import load_policy

    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    sft = load_config(make_config("sft-lora", algorithm__name="sft", algorithm__max_steps=10, algorithm__lr=1e-2,
                                  model__lora=lora))  # fmt: skip
    sft_policy = Path(api.train(sft).last_checkpoint) / "policy"
    grpo = load_config(make_config("grpo-from-sft", model__path=str(sft_policy), model__lora=lora))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        start = load_policy(grpo.model, torch.device("cpu")).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(sft.model.path).eval()
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, sft_policy).eval()(ids).logits
    assert torch.allclose(start, tuned, atol=1e-5)
    assert not torch.allclose(start, base_logits, atol=1e-3)


def test_resuming_an_older_checkpoint_sets_newer_ones_aside(make_config) -> None:
    path = make_config(
        "rollback", algorithm__max_steps=6, checkpoint__save_every_steps=2, checkpoint__keep_last=2
    )
    cfg = load_config(path)
    api.train(cfg)
    root = checkpoint.checkpoints_dir(cfg.output_dir)
    resumed = load_config(path, [f"checkpoint.resume={root / 'step_4'}", "algorithm.max_steps=5"])
    api.train(resumed)
    assert checkpoint.latest(cfg.output_dir).name == "step_5"
    assert [p.name.split("-")[0] for p in (root / "abandoned").iterdir()] == ["step_6"]
    assert [r["step"] for r in _metrics(cfg)] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_checkpoint_of_another_algorithm(make_config) -> None:
    from trainer.errors import UserError

    path = make_config("switch", algorithm__name="sft", algorithm__max_steps=2)
    api.train(load_config(path))
    with pytest.raises(UserError, match="was written by a sft run; this config trains grpo"):
        api.train(load_config(path, ["algorithm.name=grpo", "algorithm.max_steps=4"]))
