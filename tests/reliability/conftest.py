"""Fixtures of the reliability tests: ``scripts/soak.py`` as a module, and its chain of servers on 127.0.0.1.

``chain``: ``transformers serve`` on the tiny model -> ``ScoreUpstream`` (judge replies become scores)
-> ``FaultProxy``, started once per session (~7 s on 2 cores); each test gets it with the proxy's plan,
script and counters and the upstream's scripted errors reset.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from trainer.testing.fault_proxy import FaultPlan, FaultProxy
from trainer.testing.serve import TransformersServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def soak() -> ModuleType:
    # scripts/ is not a package; loading the file keeps the script and its tests on one code path.
    if "userloop_soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("userloop_soak", REPO / "scripts" / "soak.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["userloop_soak"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["userloop_soak"]


@dataclass
class Chain:
    server: TransformersServer
    upstream: Any  # soak.ScoreUpstream
    proxy: FaultProxy

    @property
    def api_base(self) -> str:
        return f"{self.proxy.url}/v1"


@pytest.fixture(scope="session")
def _chain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, soak: ModuleType) -> Iterator[Chain]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with (
        TransformersServer(tiny_model, log_path=log) as server,
        soak.ScoreUpstream(server.root_url) as upstream,
        FaultProxy(upstream.url) as proxy,
    ):
        yield Chain(server, upstream, proxy)


@pytest.fixture
def chain(_chain: Chain) -> Chain:
    _chain.proxy.set_plan(FaultPlan())
    _chain.proxy.reset_stats()
    _chain.upstream.reset()
    return _chain


def pytest_configure(config: pytest.Config) -> None:
    # litellm's response types trip a pydantic notice on first use; it is not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:Item 'summary' on TypedDict:UserWarning")
