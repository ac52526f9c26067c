"""Fields the API server would drop: what we sent, compared with what its dry run returns.

An API server that does not know a field may *prune* it instead of rejecting it: every server before
Kubernetes 1.25 (no ``fieldValidation=Strict``), and any server whose CRD is older than the fields we
send (a training-operator CRD before v1.8 drops ``initContainers[].restartPolicy``, which turns the
SGLang native sidecar into a plain init container that never exits, so the trainer never starts). The
create then succeeds, without an error or a warning, and the run misbehaves hours later. ``submit``
compares each object with its dry-run result and stops on the first dropped path (nothing is created).

Only *missing* keys count: servers add defaults, normalise quantities ("1000m" -> "1") and reorder
nothing. A key whose value is empty or zero (None, "", 0, False, {}, []) is not reported: Go's
``omitempty`` drops those from every response, and to the server they mean the same as absence.
"""

from __future__ import annotations

import re
from typing import Any

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def dropped_paths(sent: Any, returned: Any, path: str = "") -> list[str]:
    """Paths (``spec.x.containers[0].y``) present in ``sent`` with a non-empty value but absent from
    ``returned``; only the outermost dropped key of a subtree is listed."""
    out: list[str] = []
    if isinstance(sent, dict) and isinstance(returned, dict):
        for key, value in sent.items():
            where = _join(path, key)
            if key not in returned:
                if not _empty(value):
                    out.append(where)
            else:
                out += dropped_paths(value, returned[key], where)
    elif isinstance(sent, list) and isinstance(returned, list):
        for i, value in enumerate(sent):
            if i >= len(returned):
                if not _empty(value):
                    out.append(f"{path}[{i}]")
            else:
                out += dropped_paths(value, returned[i], f"{path}[{i}]")
    # A scalar that changed (a normalised quantity, an int-or-string) was kept, not dropped.
    return out


def hint(kind: str, paths: list[str]) -> str:
    """What to do about ``paths`` dropped from an object of ``kind``."""
    if kind == "PyTorchJob" and any(p.endswith(".restartPolicy") and "initContainers" in p for p in paths):
        return (
            "the PyTorchJob CRD predates training-operator v1.8 and drops native sidecars: upgrade it "
            "(`launcher doctor` checks; see k8s/README.md)"
        )
    if kind == "PyTorchJob":
        return (
            "the cluster's PyTorchJob CRD is older than these fields: upgrade the training-operator "
            "(`launcher doctor`), or remove the settings that produce them"
        )
    return (
        "the cluster's Kubernetes is older than these fields: set cluster.k8s_version to its version "
        "(`kubectl version`) and `launcher render` says which settings need it"
    )


def _join(path: str, key: str) -> str:
    # Label and annotation keys contain dots and slashes: bracket them so the path stays readable.
    part = key if _PLAIN_KEY.match(key) else f'["{key}"]'
    if not path:
        return part
    return f"{path}{part}" if part.startswith("[") else f"{path}.{part}"


def _empty(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", {}, [])
