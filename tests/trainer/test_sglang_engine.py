"""The SGLang engine against the in-repo test double of an SGLang 0.5.x server (``trainer.testing.sglang_server``).

The double runs the tiny model in a subprocess, so every number here is real: tokens sampled by the model,
log-probs of those tokens, weights reloaded from what the trainer saved. Never run against a real SGLang
server (CUDA-only, not installable here): these tests pin the client to the contract it was written for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from trainer import api
from trainer.config import load_config
from trainer.engines import SamplingParams, build_engine
from trainer.engines.hf import stop_token_ids
from trainer.engines.sglang import SGLANG_VERSION, SGLangEngine, SGLangError, release
from trainer.errors import UserError
from trainer.model import load_policy, load_tokenizer
from trainer.testing.serve import free_port
from trainer.testing.sglang_server import SGLangDouble

REPO = Path(__file__).resolve().parents[2]
LORA = {
    "enabled": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "o_proj"],
}


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    with SGLangDouble(tiny_model, enable_lora=True) as s:
        yield s


def _config(make_config, tmp_path: Path, url: str, name: str = "sg", **changes):
    sglang = {"url": url, "weights_dir": str(tmp_path / "weights"), **changes.pop("sglang", {})}
    return load_config(make_config(name, rollout__engine="sglang", rollout__sglang=sglang, **changes))


def _engine(cfg, model=None):
    tok = load_tokenizer(cfg.model.path)
    model = model if model is not None else load_policy(cfg.model, torch.device("cpu"))
    return build_engine(cfg, model, tok), model, tok


def _stats(server, reset: bool = False) -> dict:
    return httpx.get(server.url + "/_double/stats" + ("?reset=1" if reset else "")).json()


def _prompts(tok, n: int) -> list[list[int]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [tok.encode(f"The letter after {letters[i % 26]} is") for i in range(n)]


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rollout__sglang": {"sync": "lora"}},
         "rollout.sglang.sync is lora but model.lora.enabled is false"),
        ({"cluster__gpus_per_node": 2, "cluster__rollout_gpus_per_node": 1},
         r"rollout_gpus_per_node: 1 gives GPUs to a rollout sidecar \(SGLang or vLLM\) but rollout.engine is hf"),
        ({"rollout__engine": "sglang", "model__lora": LORA, "cluster__sglang__max_loaded_loras": 1},
         "cluster.sglang.max_loaded_loras: 1 is too few for LoRA hand-overs"),
        ({"rollout__engine": "sglang", "rollout__sglang": {"launch": True, "url": "http://127.0.0.1"}},
         "rollout.sglang.url: http://127.0.0.1 has no port"),
    ],
    ids=["lora-sync-without-lora", "sidecar-without-sglang", "one-loaded-lora", "launch-url-without-port"],
)  # fmt: skip
def test_config_refuses_an_engine_setup_that_cannot_work(make_config, changes, message) -> None:
    with pytest.raises(UserError, match=message):
        load_config(make_config("bad", **changes))


def test_sync_defaults_to_lora_with_lora_and_to_disk_without(make_config) -> None:
    assert load_config(make_config("d", rollout__engine="sglang")).rollout.sglang.sync == "disk"
    assert (
        load_config(make_config("l", rollout__engine="sglang", model__lora=LORA)).rollout.sglang.sync
        == "lora"
    )


def test_one_sglang_version_is_pinned_everywhere() -> None:
    """The client's contract, the sidecar image, the Dockerfile and the `sglang` extra name the same release."""
    from trainer.config.cluster import ClusterConfig

    tag = f"v{SGLANG_VERSION}-"
    assert tag in ClusterConfig().sglang_image
    assert f"FROM lmsysorg/sglang:{tag}" in (REPO / "docker/sglang.Dockerfile").read_text()
    assert tag in (REPO / "helm/userloop/values.yaml").read_text()
    assert f'"sglang=={SGLANG_VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_waits_for_readiness_then_times_out_naming_the_url_and_checks_the_version(make_config, tmp_path,
                                                                                 tiny_model) -> None:  # fmt: skip
    with SGLangDouble(tiny_model, "--start-delay", "3", "--version", "0.5.23", wait=False) as s:
        cfg = _config(make_config, tmp_path, s.url, sglang={"startup_timeout_s": 1})
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            _engine(cfg)
        assert time.monotonic() - t0 < 5  # gave up at the deadline, not at the server's pace
        text = err.value.render() + (err.value.hint or "")
        # Within 1 s the double is still importing torch: the last thing seen is a refused connection.
        assert s.url in text and "startup_timeout_s=1s" in text and "kubectl logs" in text
        assert "ConnectError" in text or "HTTP 503" in text
        # With time to wait, the client polls until the server is ready, then refuses the unpinned version.
        cfg = _config(make_config, tmp_path, s.url, sglang={"startup_timeout_s": 60})
        with pytest.raises(UserError, match=f"SGLang 0.5.23; this client was written for {SGLANG_VERSION}"):
            _engine(cfg)


def test_a_post_release_of_the_pinned_version_is_accepted(make_config, tmp_path, tiny_model) -> None:
    assert release("0.5.19.post1") == release("v0.5.19") == (0, 5, 19) != release("0.5.190")
    with SGLangDouble(tiny_model, "--version", f"{SGLANG_VERSION}.post1") as s:
        engine, _, _ = _engine(_config(make_config, tmp_path, s.url))
        assert engine.weight_version == "v0"


def test_start_up_failures_pass_through_the_barrier(server, make_config, tmp_path) -> None:
    """A rank whose checks fail tells the others (any_rank) before raising; a healthy rank then stops too."""
    cfg = _config(make_config, tmp_path, "http://127.0.0.1:9", sglang={"startup_timeout_s": 0.5})
    tok = load_tokenizer(cfg.model.path)
    model = load_policy(cfg.model, torch.device("cpu"))
    calls: list[bool] = []
    with pytest.raises(UserError, match="did not become ready"):
        build_engine(cfg, model, tok, any_rank=lambda flag: calls.append(flag) or flag)
    assert calls == [True]
    healthy = _config(make_config, tmp_path, server.url)
    with pytest.raises(SGLangError, match="failed its start-up checks on another process"):
        build_engine(healthy, model, tok, any_rank=lambda flag: True)


def test_unreachable_server_is_a_clear_error(make_config, tmp_path) -> None:
    cfg = _config(make_config, tmp_path, "http://127.0.0.1:9", sglang={"startup_timeout_s": 0.5})
    with pytest.raises(UserError, match="rollout.sglang.url http://127.0.0.1:9.*ConnectError"):
        _engine(cfg)


def test_waiting_for_the_server_is_reported_every_interval_by_the_process_that_hands_over(
    make_config, tmp_path, capsys
) -> None:
    """Up to startup_timeout_s (600 s) of silence looked like a hang in `kubectl logs` (issue 12)."""
    url = f"http://127.0.0.1:{free_port()}"
    cfg = _config(make_config, tmp_path, url, sglang={"startup_timeout_s": 1.6})
    engine = SGLangEngine(cfg, None, None, [])
    other = SGLangEngine(cfg, None, None, [], hands_over=False)  # another rank of the node: the same server
    try:
        with pytest.raises(UserError, match="did not become ready"):
            engine.wait_ready(poll_s=0.1, report_s=0.5)
        lines = capsys.readouterr().out.splitlines()
        assert 2 <= len(lines) <= 4, lines
        pattern = (
            rf"waiting for SGLang at {re.escape(url)} \(\d+s of 1\.6s\): ConnectError: .*onnection refused.*"
        )
        assert all(re.fullmatch(pattern, line) for line in lines), lines
        with pytest.raises(UserError, match="did not become ready"):
            other.wait_ready(poll_s=0.1, report_s=0.5)
        assert capsys.readouterr().out == ""
    finally:
        engine.close()
        other.close()


def test_generate_round_trip_tokens_logprobs_and_stop_tokens(server, make_config, tmp_path) -> None:
    cfg = _config(make_config, tmp_path, server.url)
    engine, model, tok = _engine(cfg)
    assert engine.weight_version == "v0" and _stats(server)["weight_version"] == "v0"
    prompts = _prompts(tok, 4)
    out = engine.generate(prompts, 3, SamplingParams(max_new_tokens=6, temperature=1.0))
    assert [len(g) for g in out] == [3, 3, 3, 3]
    stop = set(engine.stop_ids)
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            assert c.prompt_ids == prompt and 1 <= len(c.completion_ids) <= 6
            assert len(c.logprobs) == len(c.completion_ids)
            # The HF engine's convention: a finished completion ends with its stop token, nothing after it.
            assert c.finished == (c.completion_ids[-1] in stop)
            assert not stop & set(c.completion_ids[:-1])
            assert c.text == tok.decode(c.completion_ids, skip_special_tokens=True)
            # The engine's log-probs are the trainer's: same weights, same tokens, same distribution.
            ids = torch.tensor([prompt + c.completion_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            mine = logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])[:, 0]
            assert torch.allclose(mine, torch.tensor(c.logprobs), atol=1e-4), (mine, c.logprobs)
    # Greedy is deterministic and equals the argmax.
    a = engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert a[0][0].completion_ids == a[0][1].completion_ids


def test_a_stop_token_is_kept_in_the_completion_even_as_the_last_allowed_token(server, make_config,
                                                                             tmp_path) -> None:  # fmt: skip
    cfg = _config(make_config, tmp_path, server.url)
    engine, model, tok = _engine(cfg)
    with torch.no_grad():  # make <|im_end|> the only likely token
        model.lm_head.weight[tok.eos_token_id] += 50.0
    engine.sync_weights(1)
    for max_new in (1, 5):  # 1: SGLang reports "length" for a stop token at the limit; still finished
        (c,), = engine.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=max_new))  # fmt: skip
        assert c.completion_ids == [tok.eos_token_id] and c.finished and c.text == ""


def test_in_flight_requests_are_bounded_by_max_inflight(server, make_config, tmp_path) -> None:
    for limit in (3, 16):
        cfg = _config(make_config, tmp_path, server.url, sglang={"max_inflight": limit})
        engine, _, tok = _engine(cfg)
        _stats(server, reset=True)
        engine.generate(_prompts(tok, 8), 4, SamplingParams(max_new_tokens=3))
        stats = _stats(server)
        assert stats["requests"] == 32 and 1 < stats["max_in_flight"] <= limit, stats
    assert stats["max_in_flight"] > 3  # with room, many requests really are in flight together


def test_disk_sync_really_changes_the_servers_outputs(server, make_config, tmp_path) -> None:
    cfg = _config(make_config, tmp_path, server.url)
    engine, model, tok = _engine(cfg)
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0)
    before = engine.generate(_prompts(tok, 3), 1, greedy)
    target = tok.convert_tokens_to_ids("z")
    with torch.no_grad():
        model.lm_head.weight[target] += 50.0
    engine.sync_weights(7)
    after = engine.generate(_prompts(tok, 3), 1, greedy)
    assert all(g[0].completion_ids == [target] * 3 for g in after)
    assert before != after
    assert httpx.get(server.url + "/model_info").json()["weight_version"] == "v7"
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v7.a1"]  # older copies deleted


def test_logprob_diff_is_zero_with_current_weights_and_flags_stale_ones(
    server, make_config, tmp_path
) -> None:
    """``rollout/logprob_diff``'s inputs: the trajectory's engine log-probs aligned with the trainer's targets."""
    from trainer.grpo import engine_logprobs, token_logprobs, trajectory_batch
    from trainer.rollout import Trajectory

    cfg = _config(make_config, tmp_path, server.url)
    engine, model, tok = _engine(cfg)
    out = engine.generate(_prompts(tok, 4), 2, SamplingParams(max_new_tokens=5))
    trajectories = [
        Trajectory(c.prompt_ids + c.completion_ids, [0] * len(c.prompt_ids) + [1] * len(c.completion_ids), 1.0, {},
                   None, 1, len(c.completion_ids), c.finished,
                   engine_logprobs=[0.0] * len(c.prompt_ids) + c.logprobs)
        for group in out for c in group
    ]  # fmt: skip
    batch = trajectory_batch(trajectories, [1.0] * len(trajectories), tok.pad_token_id, "cpu")
    batch.engine_logp = engine_logprobs(trajectories, batch)

    def diff() -> float:
        with torch.no_grad():
            mine = token_logprobs(model, batch, cfg.rollout.temperature)[0]
        return float(((mine - batch.engine_logp).abs() * batch.loss_mask).sum() / batch.loss_mask.sum())

    assert diff() < 1e-4
    with torch.no_grad():  # the trainer moves on, the server keeps the old weights: the metric shows it
        model.lm_head.weight.mul_(1.5)
    assert diff() > 0.05


def test_lora_sync_loads_a_new_adapter_each_step_and_unloads_the_old(server, make_config, tmp_path,
                                                                    tiny_model) -> None:  # fmt: skip
    # Adapters apply to the server's base weights, which the disk-sync tests changed: back to the trainer's base.
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
    assert r.json()["success"]
    cfg = _config(make_config, tmp_path, server.url, model__lora=LORA)
    assert cfg.rollout.sglang.sync == "lora"
    engine, model, tok = _engine(cfg)
    assert engine.lora_name == "policy-n0-v0" and _stats(server)["adapters"] == ["policy-n0-v0"]
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = engine.generate(_prompts(tok, 4), 1, greedy)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    engine.sync_weights(1)
    assert engine.lora_name == "policy-n0-v1" and _stats(server)["adapters"] == ["policy-n0-v1"]
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v1.a1"]
    after = engine.generate(_prompts(tok, 4), 1, greedy)
    assert before != after
    # The server now answers what the trainer's adapter computes.
    c = after[0][0]
    ids = torch.tensor([c.prompt_ids + c.completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    mine = logp[len(c.prompt_ids) - 1 :].gather(-1, ids[0, len(c.prompt_ids) :, None])[:, 0]
    assert torch.allclose(mine, torch.tensor(c.logprobs), atol=1e-4)
    # An adapter the server does not have is SGLang's 400, surfaced with its message.
    engine.lora_name = "policy-v99"
    with pytest.raises(SGLangError, match="never been loaded"):
        engine.generate(_prompts(tok, 1), 1, greedy)


def test_failed_hand_over_is_retried_then_stops_with_a_clear_error(server, make_config, tmp_path) -> None:
    cfg = _config(make_config, tmp_path, server.url, sglang={"sync_retries": 3})
    engine, model, tok = _engine(cfg)
    httpx.post(server.url + "/_double/fail_updates", json={"n": 2})
    engine.sync_weights(1)  # two failures, then the third attempt lands
    assert engine.weight_version == "v1" and _stats(server)["weight_version"] == "v1"
    httpx.post(server.url + "/_double/fail_updates", json={"n": 3})
    with pytest.raises(SGLangError) as err:
        engine.sync_weights(2)
    text = err.value.render()
    assert "step-2 weights" in text and "after 3 attempt(s)" in text and "stale weights" in text
    assert "injected failure" in text
    httpx.post(server.url + "/_double/fail_updates", json={"n": 0})
    # Each attempt saved to a fresh folder; the step that landed keeps only the folder the server loaded.
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "policy-n0-v1.a3", "policy-n0-v2.a1", "policy-n0-v2.a2", "policy-n0-v2.a3"]  # fmt: skip


def test_a_hand_over_that_breaks_otherwise_still_reaches_the_barrier(server, make_config, tmp_path) -> None:
    """Not a transport error (a failed save): not retried, but the other ranks are told, so none hangs."""
    cfg = _config(make_config, tmp_path, server.url, sglang={"sync_retries": 3})
    engine, model, tok = _engine(cfg)
    calls: list[bool] = []
    engine.any_rank = lambda flag: calls.append(flag) or flag

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk quota exceeded (fake)")

    model.save_pretrained = broken_save
    with pytest.raises(RuntimeError, match="disk quota"):
        engine.sync_weights(1)
    assert calls == [True]
    # The rank that waits at the barrier learns of it and stops as well.
    other = SGLangEngine(
        cfg, model, tok, stop_token_ids(model, tok), any_rank=lambda flag: True, hands_over=False
    )
    with pytest.raises(SGLangError, match="step-1 weights.*failed on another node"):
        other.sync_weights(1)


def test_a_reload_answered_late_is_not_sent_again(server, make_config, tmp_path) -> None:
    """The reload outlives sync_timeout_s (its own timeout, not /generate's): the retry finds the server
    already reporting the new version and counts it done instead of re-saving and re-posting."""
    cfg = _config(make_config, tmp_path, server.url, sglang={"sync_timeout_s": 3, "sync_retries": 3})
    engine, _, _ = _engine(cfg)
    before = _stats(server)["updates"]
    httpx.post(server.url + "/_double/slow_updates", json={"n": 1, "s": 8})
    engine.sync_weights(1)
    stats = _stats(server)
    assert stats["updates"] == before + 1 and stats["weight_version"] == "v1"
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v1.a1"]


def test_lora_hand_overs_survive_a_late_answer_and_unload_leftover_adapters(server, make_config, tmp_path,
                                                                             tiny_model) -> None:  # fmt: skip
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
    assert r.json()["success"]
    cfg = _config(make_config, tmp_path, server.url, model__lora=LORA, sglang={"sync_timeout_s": 3})
    engine, _, _ = _engine(cfg)
    # A sidecar that outlived a trainer restart still holds the old run's adapter; another node has its own.
    saved = tmp_path / "old-adapter"
    shutil.copytree(tmp_path / "weights" / "policy-n0-v0.a1", saved)
    for name in ("policy-n0-v7", "policy-n1-v7"):
        r = httpx.post(
            server.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": str(saved)}, timeout=60
        )
        assert r.json()["success"], r.text
    before = _stats(server)["updates"]
    httpx.post(server.url + "/_double/slow_updates", json={"n": 1, "s": 8})
    engine.sync_weights(1)  # the load's answer comes too late: the retry asks the server, which has it
    stats = _stats(server)
    assert stats["updates"] == before + 1 and engine.lora_name == "policy-n0-v1"
    assert "policy-n0-v0" not in stats["adapters"] and "policy-n0-v1" in stats["adapters"]
    engine.sync_weights(2)  # a load that answers lists the server's adapters: this node's leftovers go
    assert sorted(_stats(server)["adapters"]) == ["policy-n0-v2", "policy-n1-v7"]
    httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": "policy-n1-v7"})


def test_nodes_sharing_a_server_and_a_weights_dir_never_clobber_each_other(server, make_config, tmp_path,
                                                                            tiny_model, monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("GROUP_RANK", "3")  # torchrun's node rank
    cfg = _config(make_config, tmp_path, server.url, model__lora=LORA)
    tok = load_tokenizer(cfg.model.path)
    model = load_policy(cfg.model, torch.device("cpu"))
    assert SGLangEngine(cfg, model, tok, []).node == 3
    a, b = (SGLangEngine(cfg, model, tok, stop_token_ids(model, tok), node=n) for n in (0, 1))
    a.sync_weights(1)
    b.sync_weights(1)
    a.sync_weights(2)
    adapters = _stats(server)["adapters"]
    assert "policy-n0-v2" in adapters and "policy-n1-v1" in adapters and "policy-n0-v1" not in adapters
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["policy-n0-v2.a1", "policy-n1-v1.a1"]
    (c,), = b.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=2))  # fmt: skip
    assert c.completion_ids
    for name in ("policy-n0-v2", "policy-n1-v1"):
        httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": name})


def test_a_reset_generate_is_retried_under_a_fresh_rid(server, make_config, tmp_path) -> None:
    """SGLang still tracks a request whose connection was reset (for seconds) and refuses its id again with a
    400 "Duplicate request ID": a retry under the same id turned a reset into a fatal error. Each attempt has
    its own id, and the previous one is aborted first."""
    cfg = _config(make_config, tmp_path, server.url)
    engine, _, tok = _engine(cfg)
    _stats(server, reset=True)
    httpx.post(server.url + "/_double/drop_generates", json={"n": 2})
    (c,), = engine.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=3))  # fmt: skip
    stats = _stats(server)
    rid = stats["rids"][0]
    assert c.completion_ids and stats["rids"] == [rid, f"{rid}.2", f"{rid}.3"], stats
    assert stats["aborted"] == [rid, f"{rid}.2"], stats
    httpx.post(server.url + "/_double/drop_generates", json={"n": 3})
    with pytest.raises(SGLangError, match="/generate failed 3 times"):
        engine.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=3))
    # A request that times out is aborted on the server too, then sent again under a new id.
    slow = _config(make_config, tmp_path, server.url, sglang={"timeout_s": 1.5})
    engine, _, tok = _engine(slow)
    _stats(server, reset=True)
    httpx.post(server.url + "/_double/slow_generates", json={"n": 1, "s": 4})
    (c,), = engine.generate(_prompts(tok, 1), 1, SamplingParams(max_new_tokens=3))  # fmt: skip
    stats = _stats(server)
    rid = stats["rids"][0]
    assert c.completion_ids and stats["rids"] == [rid, f"{rid}.2"] and stats["aborted"] == [rid], stats


def test_the_double_refuses_a_rid_it_still_tracks_as_sglang_does(server) -> None:
    """The rule behind the test above (SGLang 0.5.19 ``tokenizer_manager._init_req_state``)."""
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "rid": "dup-1"}
    httpx.post(server.url + "/_double/drop_generates", json={"n": 1})
    with pytest.raises(httpx.TransportError):
        httpx.post(server.url + "/generate", json=body, timeout=10)
    r = httpx.post(server.url + "/generate", json=body, timeout=10)  # the reset request is still tracked
    assert r.status_code == 400 and "Duplicate request ID detected: dup-1" in r.text, r.text
    httpx.post(server.url + "/abort_request", json={"rid": "dup-1"})  # frees it, as SGLang's abort does
    assert httpx.post(server.url + "/generate", json=body, timeout=30).status_code == 200


def test_logprobs_are_compared_only_for_untruncated_sampling(
    server, make_config, tmp_path, tiny_model
) -> None:
    """SGLang reports the log-probs of the top-p/top-k renormalised distribution, which the trainer does not
    score: with truncation the engine reports none and rollout/logprob_diff is not logged."""
    httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
    cfg = _config(make_config, tmp_path, server.url)
    engine, model, tok = _engine(cfg)
    prompts = _prompts(tok, 4)
    assert all(c.logprobs for g in engine.generate(prompts, 2, SamplingParams(max_new_tokens=3)) for c in g)
    for params in (SamplingParams(max_new_tokens=3, top_p=0.5), SamplingParams(max_new_tokens=3, top_k=3)):
        assert all(c.logprobs is None for g in engine.generate(prompts, 2, params) for c in g)
    # Why: what the server reports under top_p differs from the trainer's log-probs of the same tokens.
    diffs = []
    for ids in prompts:
        r = httpx.post(server.url + "/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params":
                       {"max_new_tokens": 3, "top_p": 0.5, "stop_token_ids": []}}, timeout=60).json()  # fmt: skip
        out = r["output_ids"]
        seq = torch.tensor([ids + out])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
        mine = logp[len(ids) - 1 :].gather(-1, seq[0, len(ids) :, None])[:, 0]
        diffs += (mine - torch.tensor([t[0] for t in r["meta_info"]["output_token_logprobs"]])).abs().tolist()
    assert max(diffs) > 1e-3, diffs
    run = _config(make_config, tmp_path, server.url, "sg-top-p", algorithm__max_steps=1, rollout__top_p=0.9)
    api.train(run)
    (row,) = [json.loads(x) for x in (Path(run.output_dir) / "logs/metrics.jsonl").read_text().splitlines()]
    assert "rollout/logprob_diff" not in row and row["time/weight_sync_s"] > 0


# ----------------------------------------------------------------------------- GRPO runs through the double


def _fifths(cfg) -> tuple[float, float, list[dict]]:
    rows = [
        json.loads(line)
        for line in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    k = max(1, len(rows) // 5)
    return sum(r["reward/mean"] for r in rows[:k]) / k, sum(r["reward/mean"] for r in rows[-k:]) / k, rows


@pytest.mark.slow
def test_grpo_with_sglang_full_weights_learns_like_the_hf_engine(make_config, tmp_path, tiny_model) -> None:
    """The same bar as the HF engine's test_grpo_reward_rises_full_finetune: only weights that reach the
    server every step can make the sampled answers improve."""
    with SGLangDouble(tiny_model) as s:
        cfg = _config(make_config, tmp_path, s.url, "sg-full", algorithm__max_steps=120)
        result = api.train(cfg)
        # Evaluation parity: back to the untrained weights on the server; only `launcher eval`'s own hand-over
        # of the checkpoint can make its greedy answers those of the HF engine on the same checkpoint.
        httpx.post(s.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
        via_server = api.evaluate(cfg, result.last_checkpoint)
    in_process = api.evaluate(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"engine": "hf"})}),
                              result.last_checkpoint)  # fmt: skip
    assert via_server.reward == in_process.reward > 0.8, (via_server.reward, in_process.reward)
    assert result.status == "success" and result.steps == 120
    first, last, rows = _fifths(cfg)
    assert last > first + 0.4, (first, last)
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    assert all(r["time/weight_sync_s"] > 0 for r in rows)


@pytest.mark.slow
def test_grpo_with_sglang_lora_hands_every_step_s_adapter_to_the_server(
    make_config, tmp_path, tiny_model
) -> None:
    """LoRA on the tiny model does not learn the next-letter task within a test's budget with either engine
    (measured: HF engine, 100 steps, reward 0.02 -> 0.02), so this asserts the hand-over itself: the adapter
    moves away from the base (kl > 0) while the server's log-probs stay the trainer's at every step."""
    with SGLangDouble(tiny_model, enable_lora=True) as s:
        cfg = _config(make_config, tmp_path, s.url, "sg-lora", algorithm__max_steps=20, algorithm__lr=2e-2,
                      algorithm__kl_coef=0.05, model__lora=LORA)  # fmt: skip
        api.train(cfg)
        adapters = _stats(s)["adapters"]
    _, _, rows = _fifths(cfg)
    assert len(rows) == 20 and rows[-1]["kl"] > 1e-4
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows)
    assert adapters == ["policy-n0-v20"]  # one adapter loaded at a time, the newest
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["policy-n0-v20.a1"]


def test_a_resumed_run_hands_its_weights_over_before_the_first_rollout(server, make_config, tmp_path,
                                                                        tiny_model) -> None:  # fmt: skip
    path = make_config("sg-resume", algorithm__max_steps=4, checkpoint__save_every_steps=4, rollout__engine="sglang",
                       rollout__sglang={"url": server.url, "weights_dir": str(tmp_path / "weights")})  # fmt: skip
    api.train(load_config(path))
    # A restarted sidecar: the base weights again, as after a pod restart.
    httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model), "weight_version": "base"},
               timeout=60)  # fmt: skip
    httpx.get(server.url + "/_double/stats?reset=1")
    api.train(load_config(path, ["algorithm.max_steps=6"]))
    assert _stats(server)["versions"][-3:] == [
        "v4",
        "v5",
        "v6",
    ]  # v4: the checkpoint's weights, before step 5
    rows = [json.loads(x) for x in (tmp_path / "runs/sg-resume/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["rollout/logprob_diff"] < 1e-4  # step 5 sampled from the resumed weights


def test_sft_evaluation_through_the_server_sees_each_step_s_weights(server, make_config, tmp_path,
                                                                   tiny_model) -> None:  # fmt: skip
    """SFT never hands weights over after its steps: evaluation must, or it would score the initial model."""
    evals = {}
    for engine in ("sglang", "hf"):
        httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
        cfg = load_config(make_config(f"sft-{engine}", algorithm__name="sft", algorithm__max_steps=20,
                                      algorithm__lr=3e-3, eval__every_steps=10, checkpoint__save_every_steps=None,
                                      rollout__engine=engine, rollout__sglang={"url": server.url}))  # fmt: skip
        api.train(cfg)
        rows = [json.loads(x) for x in (Path(cfg.output_dir) / "logs/metrics.jsonl").read_text().splitlines()]
        evals[engine] = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    assert evals["sglang"] == evals["hf"] and len(evals["hf"]) == 2, evals


@pytest.mark.slow
def test_two_processes_share_one_server_and_one_hand_over_per_step(make_config, tmp_path, tiny_model) -> None:
    """Local rank 0 hands the weights over, the other rank waits at the barrier; both send /generate."""
    with SGLangDouble(tiny_model) as s:
        path = make_config("sg-ddp", algorithm__max_steps=3, rollout__engine="sglang",
                           rollout__sglang={"url": s.url, "weights_dir": str(tmp_path / "weights")})  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
        stats = _stats(s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "replicas in sync: 2 processes hold the same weights" in proc.stdout
    assert stats["updates"] == 1 + 3  # the initial hand-over and one per step, not one per process
    assert stats["weight_version"] == "v3"
    assert stats["requests"] == 3 * 16 * 16  # every prompt of both ranks' shares went to the server
    rows = [json.loads(x) for x in (tmp_path / "runs/sg-ddp/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["rollout/logprob_diff"] < 1e-3 for r in rows)


@pytest.mark.slow
def test_multi_turn_episodes_keep_engine_logprobs_aligned_across_observations(
    server, tmp_path, tiny_model
) -> None:
    """Agent turns and user observations interleave in one sequence; the engine's log-probs must land on the
    agent's tokens only, or rollout/logprob_diff would be large."""
    multi = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    if multi.get("environment", {}).get("name", "single_turn") == "single_turn":
        pytest.skip("configs/quickstart.yaml is single-turn here")
    raw = multi
    data = tmp_path / "data"
    raw.update(name="sg-multi", output_dir=str(tmp_path / "runs" / "{name}"))
    raw["model"] = {"path": str(tiny_model)}
    raw["user_simulator"]["path"] = str(tiny_model)
    raw["data"]["train"]["path"], raw["data"]["val"]["path"] = (
        str(data / "train.parquet"),
        str(data / "val.parquet"),
    )
    raw["environment"].update(intentions=str(data / "i_train.json"), val_intentions=str(data / "i_val.json"))
    raw["algorithm"].update(max_steps=2)
    raw["checkpoint"] = {"resume": "never", "save_final": False}
    raw["eval"] = {}
    raw["rollout"].update(
        engine="sglang", sglang={"url": server.url, "weights_dir": str(tmp_path / "weights")}
    )
    httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
    from trainer.config import parse_config

    cfg = parse_config(raw)
    api.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "runs/sg-multi/logs/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["episodes/turns_mean"] > 1 for r in rows)
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows), [r["rollout/logprob_diff"] for r in rows]


# ----------------------------------------------------------------------------- launcher run with launch: true


def _fake_sglang(tmp_path: Path, body: str) -> dict[str, str]:
    """A ``sglang`` package whose ``launch_server`` is ``body``: the launcher's real child-process code runs."""
    pkg = tmp_path / "fake" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(body)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg.parent), str(REPO)]), OMP_NUM_THREADS="1")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("batch_size", [16, 4096], ids=["trains", "trainer-fails"])
def test_launcher_run_starts_the_server_and_always_stops_it(make_config, tmp_path, batch_size) -> None:
    env = _fake_sglang(
        tmp_path, "import sys\nfrom trainer.testing.sglang_server import main\nmain(sys.argv[1:])\n"
    )
    port = free_port()
    path = make_config("sg-launch", algorithm__max_steps=2, algorithm__batch_size=batch_size, rollout__engine="sglang",
                       rollout__sglang={"launch": True, "url": f"http://127.0.0.1:{port}"})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert f"SGLang server ready at http://127.0.0.1:{port}" in out
    assert "--host 127.0.0.1" in out and f"--port {port}" in out and "--tp-size 1" in out
    if batch_size == 16:
        assert proc.returncode == 0, out
        rows = [
            json.loads(x) for x in (tmp_path / "runs/sg-launch/logs/metrics.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 2 and all(r["time/weight_sync_s"] > 0 for r in rows)
    else:
        assert proc.returncode == 2 and "larger than the training set" in out, out
    assert _port_closed(port)  # stopped at the end, whatever the trainer's fate


def test_launcher_run_reports_a_server_that_dies_while_starting(make_config, tmp_path) -> None:
    env = _fake_sglang(tmp_path, "import sys\nprint('CUDA out of memory (fake)')\nsys.exit(3)\n")
    path = make_config("sg-dies", rollout__engine="sglang", rollout__sglang={"launch": True})
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "exited with code 3 while starting" in proc.stderr and "CUDA out of memory (fake)" in proc.stderr


def test_launcher_eval_starts_its_own_server_and_scores_the_checkpoint(
    make_config, tmp_path, tiny_model
) -> None:
    env = _fake_sglang(
        tmp_path, "import sys\nfrom trainer.testing.sglang_server import main\nmain(sys.argv[1:])\n"
    )
    port = free_port()
    path = make_config("sg-eval", rollout__engine="sglang",
                       rollout__sglang={"launch": True, "url": f"http://127.0.0.1:{port}"})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "launcher", "eval", str(path), "--checkpoint", str(tiny_model),
                           "--max-samples", "8"], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "success" and result["samples"] == 8
    assert _port_closed(port)


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("launch", [True, False], ids=["with-server", "plain"])
def test_sigterm_to_launcher_run_checkpoints_the_trainer_then_stops_the_server(make_config, tmp_path,
                                                                              launch) -> None:  # fmt: skip
    """What a job scheduler or `kill` does: the trainer gets the SIGTERM, finishes its step, checkpoints and exits
    143; then the server (if any) is stopped; the launcher exits with the trainer's code; nothing is left running."""
    pids = tmp_path / "server.pid"
    env = _fake_sglang(tmp_path, f"import os, sys\nopen({str(pids)!r}, 'w').write(str(os.getpid()))\n"
                       "from trainer.testing.sglang_server import main\nmain(sys.argv[1:])\n")  # fmt: skip
    port = free_port()
    changes = {
        "rollout__engine": "sglang",
        "rollout__sglang": {"launch": True, "url": f"http://127.0.0.1:{port}"},
    }
    path = make_config("sg-term", algorithm__max_steps=5000, checkpoint__save_every_steps=None,
                       **(changes if launch else {}))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(path)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    trainer = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                trainer = next(int(c) for c in children
                               if b"-m\x00trainer\x00" in Path(f"/proc/{c}/cmdline").read_bytes())  # fmt: skip
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert trainer is not None, out[-3000:]
    assert proc.returncode == 143 and "exiting with 143" in out, out[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "runs/sg-term/logs/metrics.jsonl").read_text().splitlines()]
    ckpt = tmp_path / f"runs/sg-term/checkpoints/step_{rows[-1]['step']}/manifest.json"
    assert ckpt.is_file(), out[-3000:]
    assert _wait_gone(trainer)
    if launch:
        assert _wait_gone(int(pids.read_text())) and _port_closed(port)


def test_launch_splits_the_gpus_and_stops_everything_the_server_spawned(make_config, tmp_path) -> None:
    """The server gets the last visible GPU(s), the trainer the rest (CUDA_VISIBLE_DEVICES); a server that dies
    leaves nothing behind, even a child that ignores SIGTERM; too few GPUs fails before anything starts."""
    from launcher.local_sglang import LocalSGLang, visible_gpus

    record, child = tmp_path / "server-gpus", tmp_path / "child.pid"
    env = _fake_sglang(tmp_path, f"import os, subprocess, sys, time\nopen({str(record)!r}, 'w').write("
                       "os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n"
                       "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                       "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
                       f"open({str(child)!r}, 'w').write(str(c.pid))\ntime.sleep(0.5)\nsys.exit(3)\n")  # fmt: skip
    path = make_config("sg-gpus", rollout__engine="sglang", rollout__sglang={"launch": True})
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], env=dict(env, CUDA_VISIBLE_DEVICES="0,1,2,3"),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "exited with code 3 while starting" in proc.stderr, proc.stderr
    assert record.read_text() == "3" and "GPUs 3" in proc.stdout
    assert _wait_gone(int(child.read_text()))

    cfg = load_config(make_config("split", rollout__engine="sglang", cluster__gpus_per_node=4,
                                  cluster__rollout_gpus_per_node=2))  # fmt: skip
    server = LocalSGLang(cfg, tmp_path / "log", env={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert (server.server_gpus, server.trainer_gpus) == (["5", "6"], ["4"])
    assert server.trainer_env({"A": "1"}) == {"A": "1", "CUDA_VISIBLE_DEVICES": "4"}
    assert "--tp-size" in server.args and server.args[server.args.index("--tp-size") + 1] == "2"
    none = LocalSGLang(cfg, tmp_path / "log", env={"CUDA_VISIBLE_DEVICES": ""})
    assert none.server_gpus is None and none.trainer_env({"A": "1"}) == {"A": "1"}  # CPU: nothing to split
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}) == ["0", "1"]

    record.unlink()
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], env=dict(env, CUDA_VISIBLE_DEVICES="0"),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "cluster.rollout_gpus_per_node" in proc.stderr and "only 1 GPU(s) are visible" in proc.stderr
    assert not record.exists()  # failed before starting the server
