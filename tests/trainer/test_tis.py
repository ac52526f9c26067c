"""Truncated importance sampling (``algorithm.tis_cap``) in ``grpo.policy_loss``, engine-agnostic.

The loss sees only the per-token log-probs an engine reported (``RolloutBatch.engine_logp``); here they are
set by hand against the trainer's own, so each token's weight is known: min(exp(old - engine), cap). Then
a run through the SGLang double sampling in bf16 (the trainer scores in float32): a real mismatch, as a
production server's, and the correction active and bounded on every step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer import api
from trainer.config import load_config
from trainer.grpo import collate, policy_loss, token_logprobs
from trainer.metrics import step_line
from trainer.model import load_policy
from trainer.testing.sglang_server import SGLangDouble


@pytest.fixture
def setup(make_config):
    cfg = load_config(make_config("tis"))
    model = load_policy(cfg.model, torch.device("cpu")).eval()
    # Two sequences of 3 prompt + 3 completion tokens, one advantage each.
    batch = collate(
        [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], [[0, 0, 0, 1, 1, 1]] * 2, [1.0, -0.5], 0, "cpu"
    )
    with torch.no_grad():
        old = token_logprobs(model, batch, cfg.rollout.temperature)[0]
    # Per trained token: the engine found it 3x less likely (weight 3: capped at 2), 2x likelier (0.5), equal (1).
    factors = torch.tensor([[3.0, 0.5, 1.0], [1.0, 3.0, 0.5]])
    engine = old.clone()
    engine[batch.loss_mask.bool()] = (old[batch.loss_mask.bool()].view(2, 3) - factors.log()).flatten()
    return cfg, SimpleNamespace(model=model), batch, engine, factors


def _loss(cfg, session, batch, engine, cap: float | None, n_tokens: float = 6.0):
    batch.old_logp, batch.engine_logp = None, engine
    cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"tis_cap": cap})})
    return policy_loss(session, batch, cfg, n_tokens)


def test_each_token_is_weighted_by_the_capped_trainer_engine_ratio(setup) -> None:
    cfg, session, batch, engine, factors = setup
    loss, stats = _loss(cfg, session, batch, engine, cap=2.0)
    # First pass: ratio 1, so each token's term is -advantage x weight.
    weights = factors.clamp(max=2.0)
    advantages = torch.tensor([[1.0], [-0.5]])
    assert float(loss.detach()) == pytest.approx(float(-(advantages * weights).sum() / 6), rel=1e-5)
    assert stats["rollout/tis_clip_frac"] == pytest.approx(2 / 6)  # the two tokens of weight 3
    assert stats["rollout/logprob_diff"] == pytest.approx(float(factors.log().abs().sum() / 6), rel=1e-5)
    # The gradient is the weighted policy gradient: sum of -A * w * d logp, over the trained tokens.
    model = session.model
    model.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = token_logprobs(model, batch, cfg.rollout.temperature)[0]
    full = torch.zeros_like(logp)
    full[batch.loss_mask.bool()] = (advantages * weights).flatten()
    (-(full * logp).sum() / 6).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_a_cap_of_null_or_an_engine_without_log_probs_leaves_the_loss_as_it_was(setup) -> None:
    cfg, session, batch, engine, _ = setup
    plain, stats = _loss(cfg, session, batch, engine, cap=None)
    assert float(plain.detach()) == pytest.approx(float(-(1.0 * 3 - 0.5 * 3) / 6), rel=1e-6)
    assert "rollout/tis_clip_frac" not in stats and "rollout/logprob_diff" in stats
    none, stats = _loss(cfg, session, batch, None, cap=2.0)  # hf: no engine log-probs
    assert float(none.detach()) == pytest.approx(float(plain.detach())) and not any(
        k.startswith("rollout/") for k in stats
    )
    # Where the engine agrees with the trainer every weight is 1: the same loss as without the correction.
    same, stats = _loss(cfg, session, batch, batch.old_logp.clone(), cap=2.0)
    assert (
        float(same.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
        and stats["rollout/tis_clip_frac"] == 0
    )


def test_the_weight_never_exceeds_the_cap_however_unlikely_the_engine_found_a_token(setup) -> None:
    cfg, session, batch, engine, _ = setup
    far = engine.clone()
    far[batch.loss_mask.bool()] -= 50.0  # exp(50): the engine all but never samples these
    for cap in (1.0, 2.0, 5.0):
        loss, stats = _loss(cfg, session, batch, far, cap=cap)
        assert math.isfinite(float(loss.detach()))
        assert float(loss.detach()) == pytest.approx(cap * float(-(1.0 * 3 - 0.5 * 3) / 6), rel=1e-5)
        assert stats["rollout/tis_clip_frac"] == pytest.approx(1.0)


def test_the_step_line_shows_the_mismatch_and_the_capped_share(tmp_path: Path) -> None:
    m = {"step": 3, "epoch": 1, "loss/policy": 0.1, "reward/mean": 0.5, "reward/std": 0.1, "lr": 1e-6,
         "rollout/logprob_diff": 0.0123, "rollout/tis_clip_frac": 0.004, "time/step_s": 1.0}  # fmt: skip
    line = step_line(m, 10, 1, 5.0)
    assert "logprob_diff 0.012 tis_clip 0.4%" in line, line
    assert "tis_clip" not in step_line({k: v for k, v in m.items() if "tis" not in k}, 10, 1, 5.0)


def test_the_cap_is_on_by_default_and_refused_below_one(make_config) -> None:
    from trainer.config import ConfigError

    assert load_config(make_config("d")).algorithm.tis_cap == 2.0
    assert load_config(make_config("n", algorithm__tis_cap=None)).algorithm.tis_cap is None
    with pytest.raises(ConfigError, match="tis_cap"):
        load_config(make_config("b", algorithm__tis_cap=0.5))


def test_a_bf16_server_s_samples_are_corrected_on_every_step_within_the_cap(
    make_config, tmp_path, tiny_model
) -> None:
    with SGLangDouble(tiny_model, "--dtype", "bfloat16") as s:
        cfg = load_config(make_config("tis-bf16", algorithm__max_steps=2, algorithm__tis_cap=1.0,
                                      rollout__engine="sglang",
                                      rollout__sglang={"url": s.url, "weights_dir": str(tmp_path / "weights")}))  # fmt: skip
        api.train(cfg)
    logs = Path(cfg.output_dir) / "logs"
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        # bf16 rounding moves the sampler's log-probs off the trainer's; with cap 1 the weight of every token the
        # trainer finds likelier than the server did is capped (about half), never all of them.
        assert r["rollout/logprob_diff"] > 2e-4, r  # float32 servers stay below 1e-4 (test_sglang_engine.py)
        assert 0.05 < r["rollout/tis_clip_frac"] < 0.95, r
    assert "tis_clip" in (logs / "train.log").read_text()
