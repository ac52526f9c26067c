"""FSDP2 (``parallel.strategy: fsdp``) on the CPU with gloo and two processes, against DDP and across resumes.

Every run is the tiny model through ``launcher run --nproc 2`` (torchrun), a few steps each: ~10 s of start-up
and seconds of training on 2 CPU cores. What each test proves:

- FSDP and DDP compute the same training (per-step loss and global gradient norm equal to float32 noise) with
  gradient accumulation and gradient checkpointing on; the loss falls; the checkpoint holds one shard file per
  rank and a ``policy/`` that ``from_pretrained`` loads, equal to DDP's; a single process resumes it (DCP
  reshards 2 -> 1, ``auto`` picks DDP there) and continues with the same numbers;
- GRPO under FSDP, preempted by SIGTERM (exit 143) and resumed on two processes, logs the same per-step numbers
  as an uninterrupted FSDP run: sharded weights, AdamW state, RNG streams and data position all come back;
- PPO under FSDP (policy and critic both sharded) logs the same per-step reward, losses, value estimates and
  both gradient norms as under DDP;
- a DDP checkpoint (optimizers keyed by position in ``training_state.pt``) resumed under FSDP continues with
  the same numbers as the uninterrupted DDP run, the critic's optimizer included;
- LoRA under FSDP learns (the SFT loss falls), and saves a plain PEFT adapter;
- the rollout hand-over of a sharded policy to an SGLang server (the repo's double) gathers the full weights
  once per step and the server samples from exactly the trainer's weights;
- the streamed export writes several safetensors files and an index that ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _run(path: Path, nproc: int = 2, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "run",
        str(path),
        *args,
        *(["--nproc", str(nproc)] if nproc > 1 else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(path: Path) -> list[dict]:
    cfg = load_config(path)
    return [json.loads(x) for x in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def _same(a: list[dict], b: list[dict], keys: tuple[str, ...], rel: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in keys:
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=rel, abs=1e-7), key


SFT = {"algorithm__name": "sft", "algorithm__max_steps": 4, "algorithm__lr": 3e-3, "algorithm__grad_accum": 2,
       "model__gradient_checkpointing": True, "checkpoint__save_every_steps": 2, "eval": {}}  # fmt: skip


def test_fsdp_trains_as_ddp_does_and_its_checkpoint_resumes_in_one_process(make_config, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ddp = make_config("sft-ddp", parallel={"strategy": "ddp"}, **SFT)
    fsdp = make_config("sft-fsdp", parallel={"strategy": "fsdp"}, **SFT)
    _run(ddp)
    out = _run(fsdp).stdout
    assert "parallel: fsdp over 2 process(es)" in out and "replicas in sync" not in out
    a, b = _metrics(ddp), _metrics(fsdp)
    _same(a, b, ("loss/sft", "grad_norm"))
    assert b[-1]["loss/sft"] < 0.95 * b[0]["loss/sft"], [r["loss/sft"] for r in b]  # it learns

    step2 = tmp_path / "runs" / "sft-fsdp" / "checkpoints" / "step_2"
    assert sorted(p.name for p in (step2 / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in torch.load(step2 / "training_state.pt", weights_only=False)  # it is in dcp/
    final = {n: AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / n / "checkpoints" / "step_4" / "policy")
             for n in ("sft-ddp", "sft-fsdp")}  # fmt: skip
    for (name, x), y in zip(
        final["sft-ddp"].state_dict().items(), final["sft-fsdp"].state_dict().values(), strict=True
    ):
        assert torch.allclose(x, y, atol=1e-6), name

    # 2 processes -> 1: the shards are read into whole tensors (parallel: auto is DDP for one process).
    one = make_config("sft-one", **{**SFT, "checkpoint__resume": str(step2)})
    out = _run(one, 1).stdout
    assert f"resumed from {step2} at step 2" in out and "parallel: ddp (auto: one process" in out
    _same(b[2:], _metrics(one), ("loss/sft", "grad_norm"))


@pytest.mark.slow
def test_fsdp_preempted_by_sigterm_resumes_exactly(make_config) -> None:
    grpo = {"algorithm__max_steps": 6, "checkpoint__save_every_steps": None, "eval": {},
            "parallel": {"strategy": "fsdp"}}  # fmt: skip
    straight = make_config("grpo-straight", **grpo)
    _run(straight)
    path = make_config("grpo-preempt", **grpo)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped = _metrics(path)[-1]["step"]
    assert stopped < 6 and f"checkpointing step {stopped} and exiting with 143" in log, log[-3000:]
    assert "resumed from" in _run(path).stdout
    _same(_metrics(straight), _metrics(path), ("reward/mean", "loss/policy", "entropy", "grad_norm"))


PPO = {"algorithm__name": "ppo", "algorithm__max_steps": 4, "algorithm__critic_lr": 4e-3,
       "checkpoint__save_every_steps": 2, "eval": {}}  # fmt: skip
PPO_KEYS = ("reward/mean", "loss/policy", "loss/value", "value/mean", "grad_norm", "critic/grad_norm")


@pytest.mark.slow
def test_ppo_critic_under_fsdp_trains_as_under_ddp(make_config) -> None:
    ddp = make_config("ppo-ddp", parallel={"strategy": "ddp"}, **PPO)
    fsdp = make_config("ppo-fsdp", parallel={"strategy": "fsdp"}, **PPO)
    _run(ddp)
    assert "parallel: fsdp over 2 process(es)" in _run(fsdp).stdout
    _same(_metrics(ddp), _metrics(fsdp), PPO_KEYS)
    critic = Path(load_config(fsdp).output_dir) / "checkpoints" / "step_4" / "critic"
    assert (critic / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp(make_config) -> None:
    """A DDP checkpoint (optimizers keyed by position in training_state.pt) resumed sharded: policy and critic."""
    ddp = make_config("ppo-ddp", parallel={"strategy": "ddp"}, **PPO)
    _run(ddp)
    step2 = Path(load_config(ddp).output_dir) / "checkpoints" / "step_2"
    fsdp = make_config("ppo-fsdp", parallel={"strategy": "fsdp"}, **{**PPO, "checkpoint__resume": str(step2)})
    out = _run(fsdp).stdout
    assert f"resumed from {step2} at step 2" in out and "parallel: fsdp over 2 process(es)" in out
    _same(_metrics(ddp)[2:], _metrics(fsdp), PPO_KEYS)


def test_lora_under_fsdp_learns_and_saves_an_adapter(make_config, tiny_model) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    path = make_config("lora-fsdp", algorithm__name="sft", algorithm__max_steps=10, algorithm__lr=1e-2,
                       model__lora=lora, parallel={"strategy": "fsdp"}, checkpoint__save_every_steps=None,
                       eval={})  # fmt: skip
    _run(path)
    rows = _metrics(path)
    # 5.05 -> ~4.4 nats in 10 steps, where the adapter of this random tiny model levels off
    assert rows[-1]["loss/sft"] < 0.9 * rows[0]["loss/sft"], [r["loss/sft"] for r in rows]
    policy = Path(load_config(path).output_dir) / "checkpoints" / "step_10" / "policy"
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "model.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), policy)


@pytest.mark.slow
def test_sharded_policy_hands_the_server_its_exact_weights_once_per_step(
    make_config, tmp_path, tiny_model
) -> None:
    import httpx

    from trainer.testing.sglang_server import SGLangDouble

    with SGLangDouble(tiny_model) as server:
        path = make_config("sg-fsdp", algorithm__max_steps=3, rollout__engine="sglang", parallel={"strategy": "fsdp"},
                           rollout__sglang={"url": server.url, "weights_dir": str(tmp_path / "weights")},
                           checkpoint__save_every_steps=None, eval={})  # fmt: skip
        _run(path)
        stats = httpx.get(server.url + "/_double/stats").json()
    assert stats["updates"] == 1 + 3 and stats["weight_version"] == "v3"  # one gathered hand-over per step
    rows = _metrics(path)
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v3.a1"]  # the staging is gone


def test_streamed_export_is_split_into_files_from_pretrained_reads(tiny_model, tmp_path) -> None:
    """The writer behind every sharded export: several safetensors files and their index, tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer import parallel

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    writer = parallel._ShardWriter(tmp_path, limit=20_000)
    for name, t in parallel._unique_tensors(model, trainable_only=False):
        writer.add(name, t.detach())
    writer.close()
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
