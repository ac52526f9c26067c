"""``launcher.pruned``: which sent fields a dry-run answer lacks (the real server's side is in
test_launcher_kube_apiserver.py)."""

from __future__ import annotations

from typing import Any

import pytest

from launcher.pruned import dropped_paths, hint

CASES: list[tuple[str, Any, Any, list[str]]] = [
    ("kept as sent", {"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "x"}]}}, []),
    ("defaults added", {"a": 1}, {"a": 1, "b": {"c": 2}}, []),
    ("a quantity normalised", {"cpu": "1000m"}, {"cpu": "1"}, []),
    ("a key dropped", {"a": {"b": 1, "bogus": 2}}, {"a": {"b": 1}}, ["a.bogus"]),
    ("only the outermost dropped key", {"x": {"y": {"z": 1}}}, {}, ["x"]),
    ("in a list", {"cs": [{"n": "a"}, {"n": "b", "new": True}]}, {"cs": [{"n": "a"}, {"n": "b"}]}, ["cs[1].new"]),
    ("a list item", {"l": [1, 2]}, {"l": [1]}, ["l[1]"]),
    # Go's omitempty leaves these out of every answer; to the server they equal absence.
    ("empty and zero values", {"a": "", "b": 0, "c": False, "d": [], "e": {}, "f": None}, {}, []),
    ("a dotted label key", {"labels": {"app.kubernetes.io/name": "u"}}, {"labels": {}}, ['labels["app.kubernetes.io/name"]']),
]  # fmt: skip


@pytest.mark.parametrize(("sent", "returned", "paths"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dropped_paths(sent: Any, returned: Any, paths: list[str]) -> None:
    assert dropped_paths(sent, returned) == paths


def test_the_hint_names_the_old_crd_when_native_sidecars_are_dropped() -> None:
    sidecar = "spec.pytorchReplicaSpecs.Master.template.spec.initContainers[0].restartPolicy"
    assert "predates training-operator v1.8" in hint("PyTorchJob", [sidecar])
    assert "upgrade the training-operator" in hint("PyTorchJob", ["spec.runPolicy.newThing"])
    assert "cluster.k8s_version" in hint("ConfigMap", ["bogus"])
