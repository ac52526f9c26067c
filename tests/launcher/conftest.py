"""Fixtures of the launcher tests: configs, rendering, and the local Kubernetes test double."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_k8s_double import K8sDouble


@pytest.fixture
def double() -> Iterator[K8sDouble]:
    d = K8sDouble().start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def kubeconfig(double: K8sDouble, tmp_path: Path) -> Path:
    return double.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture(autouse=True)
def _no_real_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never reach a developer's real cluster from a test.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
