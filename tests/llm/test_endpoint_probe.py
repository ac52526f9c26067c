"""The run-start check of API endpoints (``check_endpoints``, ``ApiClient.probe``) against a real
``transformers serve`` behind the fault proxy; litellm and httpx are not mocked.

Every test runs with ``ProcessApiClient`` (the probe runs in the API worker, as in a run) and with ``ApiClient``.
The server's own ``GET /v1/models`` answers 500 (transformers 5.23, no hub cache) or 200 (5.24): both pass
without a completion, so these tests script the proxy wherever the path taken matters.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from trainer.config.multiturn import ApiBackendConfig
from trainer.errors import UserError
from trainer.llm import LoopThread, check_endpoints, make_client
from trainer.llm.api import ApiClient
from trainer.llm.process import ProcessApiClient
from trainer.testing.fault_proxy import FaultProxy
from trainer.testing.scripted import ScriptedClient
from trainer.testing.serve import TransformersServer, free_port

KIND = "process"


@pytest.fixture(autouse=True, params=["process", "in_process"])
def client_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "KIND", request.param)
    return request.param


def client_for(
    server: TransformersServer, base: str, role: str = "user_simulator", key_env: str | None = None, **kw
) -> ApiClient | ProcessApiClient:
    settings = dict(model=server.model, api_base=base, api_key_env=key_env, timeout_s=5.0, retries=3,
                    backoff_s=0.02, max_tokens=4)  # fmt: skip
    settings.update(kw)
    return make_client(ApiBackendConfig(**settings), role, in_process=KIND == "in_process")  # type: ignore[return-value]


def check(loop: LoopThread, *clients) -> None:
    try:
        loop.run(check_endpoints(clients), timeout=60)
    finally:
        for c in clients:
            loop.run(c.aclose())


def failure(loop: LoopThread, *clients) -> UserError:
    with pytest.raises(UserError) as err:
        check(loop, *clients)
    return err.value


def test_a_live_endpoint_passes_with_one_free_request(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    user = client_for(server, proxy.url + "/v1")
    judge = client_for(server, proxy.url + "/v1", role="judge")
    check(loop, user, judge, ScriptedClient(lambda m: "ok"))  # a client without a probe is not checked
    stats = proxy.stats()
    # One GET /models for the two roles that share the endpoint; no completion, no token spent.
    assert stats["requests"] == stats["models_requests"] == 1
    assert user.stats.snapshot()["api/calls"] == 0 and judge.stats.snapshot()["api/calls"] == 0


def test_a_dead_port_fails_naming_the_role_the_url_and_the_cause(
    server: TransformersServer, loop: LoopThread
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    err = failure(loop, client_for(server, base, role="judge"))
    assert time.monotonic() - t0 < 10  # fails fast: no completion retries after a refused connection
    assert err.source == "judge.api_base" and err.exit_code == 2
    assert err.problems == [f"cannot reach {base}: connection refused: 127.0.0.1:{port} (GET {base}/models)"]
    assert err.hint is not None and f"the server at {base} runs" in err.hint and "judge.api_base" in err.hint


def test_an_unresolvable_host_fails_clearly(server: TransformersServer, loop: LoopThread) -> None:
    err = failure(loop, client_for(server, "http://no-such-host.invalid/v1"))
    assert err.problems[0].startswith("cannot reach http://no-such-host.invalid/v1: cannot resolve the host ")


def test_a_rejected_key_fails_clearly_and_never_shows_the_key(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, marker_key: tuple[str, str]
) -> None:
    key_env, key = marker_key
    proxy.script("unauthorized", route="models")
    err = failure(loop, client_for(server, proxy.url + "/v1", key_env=key_env))
    base = proxy.url + "/v1"
    assert err.source == "user_simulator.api_base"
    assert err.problems == [
        f"{base} refused the key in {key_env}: HTTP 401: "
        '{"error": {"message": "Incorrect API key provided (injected)", "type": "invalid_request_error", '
        f'"code": "invalid_api_key"}}}} (GET {base}/models)'
    ]
    assert err.hint is not None and f"check the key in {key_env}" in err.hint
    assert proxy.stats()["with_authorization"] == 1  # the key was sent ...
    assert key not in err.render() + err.hint  # ... and is not in the error


def test_a_relay_without_a_model_list_is_checked_with_one_token(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    client = client_for(server, proxy.url + "/v1")
    proxy.script("not_found", route="models")
    check(loop, client)
    stats = proxy.stats()
    assert stats["requests"] == 2 and stats["models_requests"] == 1 and stats["forwarded"] == 1
    assert client.stats.snapshot()["api/calls"] == 0  # the probe's completion is not one of the run's calls


def test_the_one_token_check_catches_a_wrong_key_and_a_wrong_setting(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    base = proxy.url + "/v1"
    proxy.script("not_found", route="models")
    proxy.script("unauthorized")
    err = failure(loop, client_for(server, base))
    checked = f"POST {base}/chat/completions, 1 token (GET /models: not_found 404)"
    assert err.problems[0].startswith(
        f"{base} refused the key (none sent: api_key_env is not set): HTTP 401: "
    )
    assert err.problems[0].endswith(f"({checked})")
    assert err.hint is not None and "set user_simulator.api_key_env" in err.hint
    assert proxy.stats()["requests"] == 2  # a 401 is not retried
    # DashScope's Qwen3 wants extra_body {enable_thinking: false}; a server that refuses a field stops the run.
    proxy.script("not_found", route="models")
    err = failure(loop, client_for(server, base, role="judge", extra_body={"enable_thinking": False}))
    assert err.problems == [
        f"{base} refused a 1-token request with these settings: HTTP 422: "
        f"""{{"detail":"Unexpected fields in the request: {{'enable_thinking'}}"}} ({checked})"""
    ]
    assert err.hint == "check judge.model and judge.extra_body against the server's answer above"


def test_a_busy_endpoint_does_not_stop_the_run(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy.script("rate_limit", route="models")
    check(loop, client_for(server, proxy.url + "/v1"))  # a 429 on the list: the endpoint is there
    assert proxy.stats()["requests"] == 1
    # No list, and the completion meets 5xx twice: a warning, and the run's own retries take it from there.
    proxy.script("not_found", route="models")
    proxy.script("server_error", "server_error")
    check(loop, client_for(server, proxy.url + "/v1"))
    assert "warning: start-up check of user_simulator (openai/" in capsys.readouterr().err


def test_every_failed_endpoint_is_reported_at_once(
    server: TransformersServer, proxy: FaultProxy, loop: LoopThread
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    err = failure(loop, client_for(server, dead), client_for(server, proxy.url + "/v1", role="judge"),
                  client_for(server, dead, role="judge", model="other"))  # fmt: skip
    assert err.source == "user_simulator.api_base, judge.api_base"
    assert len(err.problems) == 2 and all(p.startswith(f"cannot reach {dead}") for p in err.problems)


def test_episode_runners_check_the_clients_they_build(
    server: TransformersServer, tmp_path: Path, tiny_model: Path
) -> None:
    """``EpisodeRunner`` (training, and ``launcher eval`` through it) probes the clients it builds from the
    config when it starts; clients handed to it (tests' scripted ones) are the caller's business."""
    from trainer.config import parse_config
    from trainer.envs.intentiongym_sample import write_sample
    from trainer.model import load_tokenizer
    from trainer.rollout import EpisodeRunner

    if KIND == "in_process":
        pytest.skip("EpisodeRunner builds process clients; once is enough")
    sample = write_sample(tmp_path / "data", train=2, test=1, seed=0)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = parse_config({
        "name": "probe", "model": {"path": str(tiny_model)}, "algorithm": {"name": "grpo"},
        "data": {"train": {"path": str(sample["train"])}},
        "environment": {"name": "intentiongym", "intentions": str(sample["train_intentions"]),
                        "judge_backend": "rule"},
        "user_simulator": {"model": server.model, "api_base": dead, "api_key_env": None, "extra_body": {}},
    })  # fmt: skip
    tok = load_tokenizer(tiny_model)
    engine = object()  # no episode is played
    with pytest.raises(UserError, match=f"user_simulator.api_base: cannot reach {dead}: connection refused"):
        EpisodeRunner(cfg, engine, tok, [], str(tmp_path / "run"))  # type: ignore[arg-type]
    given = ScriptedClient(lambda m: "ok", role="user_simulator")
    EpisodeRunner(cfg, engine, tok, [], str(tmp_path / "run"), clients={"user_simulator": given}).close()  # type: ignore[arg-type]
