"""``launcher doctor [CONFIG]``: is this cluster ready for a run? One line per check, ✓ or ✗ and what to do.

Checks what otherwise fails late and silently: which job API the cluster serves (PyTorchJob, Kubeflow
Trainer's TrainJob, or both) against the config's ``cluster.api``, a PyTorchJob or runtime CRD too old to
keep native sidecars (the field is dropped, the sidecar becomes a plain init container and the trainer
never starts), a missing
Secret or key (pods sit in CreateContainerConfigError while the job never fails), a PVC that is unbound
or not ReadWriteMany for a multi-node run, no node with enough GPUs. All reads go through ``Cluster``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.cluster import Cluster, ClusterError, ClusterUnreachable
from launcher.job_apis import CLUSTER_TRAINING_RUNTIME, JOB_APIS, TRAINJOB, JobApi
from trainer.config import RunConfig

OPERATOR_VERSION = "v1.8.1"
INSTALL_OPERATOR = (
    "kubectl apply --server-side -k "
    f'"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref={OPERATOR_VERSION}"'
)


@dataclass
class Check:
    ok: bool | None  # None: could not tell (e.g. no permission)
    what: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "?"}[self.ok]
        return f"{mark} {self.what}" + (f" -> {self.fix}" if self.fix and self.ok is not True else "")


def run_checks(cluster: Cluster, cfg: RunConfig | None) -> list[Check]:
    checks = [Check(True, f"API server {cluster.host} reachable, namespace {cluster.namespace}")]
    checks += _job_apis(cluster, cfg)
    checks.append(_namespace(cluster))
    if cfg is not None:
        checks += _secret(cluster, cfg)
        checks.append(_pvc(cluster, cfg))
        checks += _priority_class(cluster, cfg)
    checks.append(_gpus(cluster, cfg))
    return checks


def _guard(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ClusterUnreachable:
        raise  # every other check would say the same: one error, and the exit code of a cluster error
    except ClusterError as e:
        return Check(None, f"{e.source}: {e.problems[0]}", e.hint or "")


def _job_apis(cluster: Cluster, cfg: RunConfig | None) -> list[Check]:
    """The CRDs of the job API the config uses (PyTorchJob without a config), in detail; the other API only
    when the cluster serves it: as an alternative, or as the fix when the chosen one is missing."""
    chosen = JOB_APIS[cfg.cluster.api if cfg else "pytorchjob"]
    other = next(api for api in JOB_APIS.values() if api is not chosen)
    check = _CRD_CHECKS[chosen.name](cluster)
    if not _served(cluster, other):
        return [check]
    if check.ok is False:
        check.fix = f"this cluster serves {other.kind} ({other.product}): set cluster.api: {other.name}; or {check.fix}"
        return [check]
    return [check, Check(True, f"the cluster also serves {other.kind} ({other.product}): cluster.api: {other.name} would work too")]  # fmt: skip


def _served(cluster: Cluster, api: JobApi) -> bool:
    """Whether the cluster serves the job API's kind (False also when this account may not tell)."""
    crd = _guard(cluster.crd, api.resource.crd, api.kind)
    if isinstance(crd, Check) or crd is None:
        return False
    return any(
        v.get("name") == api.resource.version and v.get("served") for v in crd["spec"].get("versions", [])
    )


# Kubeflow Trainer runs every TrainJob as a JobSet (its install brings JobSet along).
JOBSET_CRD = "jobsets.jobset.x-k8s.io"


def _trainjob_crds(cluster: Cluster) -> Check:
    """TrainJob, ClusterTrainingRuntime and JobSet CRDs; the runtime's pod keeps native sidecars; the TrainJob
    knows spec.activeDeadlineSeconds (Kubeflow Trainer v2.2, the oldest whose API the chart's objects fit)."""
    found = {}
    install = f"install Kubeflow Trainer v2.3: {TRAINJOB.install}"
    for name, kind in ((TRAINJOB.resource.crd, "TrainJob"), (CLUSTER_TRAINING_RUNTIME.crd, "ClusterTrainingRuntime"),
                       (JOBSET_CRD, "JobSet")):  # fmt: skip
        crd = _guard(cluster.crd, name, kind)
        if isinstance(crd, Check):
            return crd
        if crd is None:
            return Check(False, f"{kind} CRD ({name.split('.', 1)[1]}) is not installed", install)
        found[kind] = crd
    schemas = {}
    for kind in ("TrainJob", "ClusterTrainingRuntime"):
        versions = {v.get("name"): v for v in found[kind].get("spec", {}).get("versions", [])}
        served = versions.get(TRAINJOB.resource.version)
        if not served or not served.get("served"):
            return Check(False, f"{kind} CRD does not serve {TRAINJOB.resource.api_version}", install)
        schemas[kind] = served.get("schema", {}).get("openAPIV3Schema", {})
    spec = (schemas["TrainJob"].get("properties") or {}).get("spec") or {}
    if "activeDeadlineSeconds" not in (spec.get("properties") or {}):
        return Check(
            False,
            "TrainJob CRD predates Kubeflow Trainer v2.2 (no spec.activeDeadlineSeconds)",
            f"upgrade: {install}",
        )
    if not crd_keeps_native_sidecars(schemas["ClusterTrainingRuntime"]):
        return Check(False, "ClusterTrainingRuntime CRD drops initContainers[].restartPolicy, so the SGLang sidecar "
                     "would block the trainer", f"upgrade: {install}")  # fmt: skip
    return Check(
        True, "TrainJob, ClusterTrainingRuntime and JobSet CRDs installed; the runtime keeps native sidecars"
    )


def _crd(cluster: Cluster) -> Check:
    crd = _guard(cluster.job_crd)
    if isinstance(crd, Check):
        return crd
    if crd is None:
        return Check(
            False,
            "PyTorchJob CRD (kubeflow.org) is not installed",
            f"install the training-operator: {INSTALL_OPERATOR}",
        )
    versions = {v.get("name"): v for v in crd.get("spec", {}).get("versions", [])}
    v1 = versions.get("v1")
    if not v1 or not v1.get("served"):
        return Check(
            False,
            "PyTorchJob CRD does not serve kubeflow.org/v1",
            f"reinstall the training-operator {OPERATOR_VERSION}",
        )
    if not crd_keeps_native_sidecars(v1.get("schema", {}).get("openAPIV3Schema", {})):
        return Check(
            False,
            "PyTorchJob CRD predates training-operator v1.8: it drops initContainers[].restartPolicy, so the SGLang "
            "sidecar would block the trainer",
            f"upgrade: {INSTALL_OPERATOR}",
        )
    return Check(True, "PyTorchJob CRD installed and keeps native sidecars (training-operator >= v1.8)")


_CRD_CHECKS = {"pytorchjob": _crd, "trainjob": _trainjob_crds}


def crd_keeps_native_sidecars(schema: dict[str, Any]) -> bool:
    """True when the pod template's ``initContainers`` items know ``restartPolicy``."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        props = node.get("properties") or {}
        init = props.get("initContainers")
        if isinstance(init, dict):
            return "restartPolicy" in ((init.get("items") or {}).get("properties") or {})
        stack.extend(props.values())
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                stack.append(node[key])
    return False


def _namespace(cluster: Cluster) -> Check:
    found = _guard(cluster.namespace_exists)
    if isinstance(found, Check):
        return found
    if found is None:
        return Check(
            None, f"namespace {cluster.namespace}: not allowed to read namespaces", "ask an admin, or ignore"
        )
    if not found:
        return Check(
            False, f"namespace {cluster.namespace} does not exist", "kubectl apply -f k8s/namespace.yaml"
        )
    return Check(True, f"namespace {cluster.namespace} exists")


def _secret(cluster: Cluster, cfg: RunConfig) -> list[Check]:
    s = cfg.cluster.api_key_secret
    if s is None:
        return []
    keys = _guard(cluster.secret_keys, s.name)
    if isinstance(keys, Check):
        return [keys]
    create = (
        f'kubectl create secret generic {s.name} -n {cluster.namespace} --from-literal={s.key}="$YOUR_KEY"'
    )
    if keys is None:
        return [
            Check(
                False, f"Secret {s.name} is missing (pods would hang in CreateContainerConfigError)", create
            )
        ]
    if s.key not in keys:
        return [
            Check(False, f"Secret {s.name} has no key {s.key!r} (has {', '.join(keys) or 'none'})", create)
        ]
    return [Check(True, f"Secret {s.name} has key {s.key} (becomes ${s.env})")]


def _pvc(cluster: Cluster, cfg: RunConfig) -> Check:
    p = cfg.cluster.pvc
    pvc = _guard(cluster.get, "PersistentVolumeClaim", p.name)
    if isinstance(pvc, Check):
        return pvc
    if pvc is None:
        if p.create:
            return Check(
                True, f"PVC {p.name} does not exist yet; submit creates it ({p.size}, {p.access_mode})"
            )
        return Check(
            False,
            f"PVC {p.name} does not exist",
            "kubectl apply -f k8s/pvc-rwx.yaml, or set cluster.pvc.create: true",
        )
    phase = (pvc.get("status") or {}).get("phase")
    modes = (pvc.get("spec") or {}).get("accessModes") or []
    if p.access_mode not in modes:
        return Check(
            False,
            f"PVC {p.name} has access modes {modes}, the config says {p.access_mode}",
            "fix cluster.pvc.access_mode",
        )
    if phase != "Bound":
        note = (
            "normal for WaitForFirstConsumer storage classes"
            if phase == "Pending"
            else "check `kubectl describe pvc`"
        )
        return Check(None, f"PVC {p.name} is {phase}", note)
    return Check(True, f"PVC {p.name} is Bound ({', '.join(modes)})")


def _priority_class(cluster: Cluster, cfg: RunConfig) -> list[Check]:
    # The job is accepted without it, but admission refuses every pod the operator creates: the job stays
    # Created with no pods, and only the job's events (FailedCreatePod) say why.
    name = cfg.cluster.priority_class
    if not name:
        return []
    found = _guard(cluster.priority_class_exists, name)
    if isinstance(found, Check):
        return [found]
    if found is None:
        return [Check(None, f"PriorityClass {name}: not allowed to read PriorityClasses", "ask an admin, or ignore")]  # fmt: skip
    if not found:
        fix = "`kubectl get priorityclasses` lists them: fix cluster.priority_class"
        return [
            Check(False, f"PriorityClass {name} does not exist (every pod of the run would be refused)", fix)
        ]
    return [Check(True, f"PriorityClass {name} exists")]


def _gpus(cluster: Cluster, cfg: RunConfig | None) -> Check:
    need = cfg.cluster.gpus_per_node if cfg else 1
    want_nodes = cfg.cluster.nodes if cfg else 1
    selector = ",".join(f"{k}={v}" for k, v in (cfg.cluster.node_selector if cfg else {}).items())
    if need == 0:
        return Check(True, "the run needs no GPUs")
    nodes = _guard(cluster.gpu_nodes, selector)
    if isinstance(nodes, Check):
        return Check(None, f"GPU nodes: {nodes.what}", "needs permission to list nodes, or ignore")
    fit = [
        n
        for n in nodes
        if int((n.get("status") or {}).get("allocatable", {}).get("nvidia.com/gpu", 0)) >= need
    ]
    where = f" matching {selector}" if selector else ""
    if len(fit) < want_nodes:
        return Check(
            False,
            f"{len(fit)} node(s){where} with >= {need} allocatable nvidia.com/gpu; the run needs {want_nodes}",
            "check the NVIDIA device plugin and cluster.node_selector, or lower cluster.gpus_per_node / nodes",
        )
    return Check(True, f"{len(fit)} node(s){where} with >= {need} allocatable nvidia.com/gpu")
