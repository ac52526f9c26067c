"""Fixtures of the launcher tests: configs, rendering, the local Kubernetes test double, and a real
kube-apiserver on loopback (started once per session; its tests skip, with the reason, where etcd or
the binary is missing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kube_apiserver import KubeApiserver, collection, missing, wait_established
from launcher_k8s_double import K8sDouble
from launcher_paths import REPO

from launcher import checks


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


PRIORITY_CLASS = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "high"},
                  "value": 1000}  # fmt: skip


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeApiserver]:
    """A real API server with our PyTorchJob CRD copy installed and k8s/namespace.yaml applied, as an
    admin would prepare a cluster (k8s/README.md steps 1-2). Shared by the session: tests use their
    own run names and namespaces."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    server = KubeApiserver().start()
    try:
        server.request(
            "POST", collection("CustomResourceDefinition"), yaml.safe_load(checks.CRD_PATH.read_text())
        )
        for obj in yaml.safe_load_all((REPO / "k8s" / "namespace.yaml").read_text()):
            server.request("POST", collection(obj["kind"], obj["metadata"].get("namespace", "")), obj)
        # The test config's cluster.priority_class: without it the Priority admission plugin refuses
        # every pod of the run (the job itself is accepted).
        server.request("POST", collection("PriorityClass"), PRIORITY_CLASS)
        wait_established(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin_kubeconfig(kube_api: KubeApiserver, tmp_path: Path) -> Path:
    return kube_api.kubeconfig(tmp_path / "admin-kubeconfig", namespace="userloop")
