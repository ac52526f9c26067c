"""Session fixtures for API tests: the tiny model, ``transformers serve`` on it, a fault proxy, one event loop.

The server starts once per session (~7 s on 2 cores); each test gets the proxy with its script,
plan and counters reset. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.llm.loop import LoopThread
from trainer.testing.fault_proxy import FaultPlan, FaultProxy
from trainer.testing.serve import TransformersServer
from trainer.tiny import build_tiny_model

MARKER_KEY = "sk-userloop-marker-5f1c9a7e2b"  # a fake key whose value must never show up anywhere


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServer]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with TransformersServer(tiny_model, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="session")
def _proxy(server: TransformersServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.root_url) as proxy:
        yield proxy


@pytest.fixture
def proxy(_proxy: FaultProxy) -> FaultProxy:
    _proxy.set_plan(FaultPlan())
    _proxy.reset_stats()
    return _proxy


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    with LoopThread(name="test-api-loop") as lt:
        yield lt


@pytest.fixture
def marker_key(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """``(variable name, key value)`` of a fake key set in the environment for one test."""
    monkeypatch.setenv("USERLOOP_TEST_KEY", MARKER_KEY)
    return "USERLOOP_TEST_KEY", MARKER_KEY


def pytest_configure(config: pytest.Config) -> None:
    # litellm's response types trip a pydantic notice on first use; it is not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:Item 'summary' on TypedDict:UserWarning")
