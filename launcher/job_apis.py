"""The two job APIs a run can be submitted as, each described once; ``cluster.api`` picks one.

- ``pytorchjob``: Kubeflow training-operator v1's PyTorchJob (``kubeflow.org/v1``). The default.
- ``trainjob``: Kubeflow Trainer v2's TrainJob (``trainer.kubeflow.org/v1alpha1``), which the Trainer
  controller turns into a JobSet from the ClusterTrainingRuntime rendered next to it.

Everything that differs between the two at run time lives here: REST coordinates, the condition types
that mean success and failure, how a job's pods are found and which one runs rank 0, the trainer
container's name, where the controller records that it could not create pods. ``cluster.py``,
``runs.py``, ``checks.py`` and ``doctor.py`` read these descriptions instead of branching on the kind.
Plain data and functions over dicts: nothing here imports the kubernetes client.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Pods = Callable[[], list[dict[str, Any]]]


@dataclass(frozen=True)
class Resource:
    """A custom resource the launcher creates, reads or deletes."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"


@dataclass(frozen=True)
class JobApi(ABC):
    """One job API. Subclasses say how the controller names pods and reports replicas."""

    name: str  # the value of cluster.api
    resource: Resource
    runtime: Resource | None  # a cluster-scoped object each run creates before its job, or None
    succeeded: str  # the condition type that means the job succeeded
    failed: str
    pod_label: str  # the label the controller puts on every pod of job <run>, with the value <run>
    trainer_container: str
    primary_replica: str  # the replica whose pod runs rank 0 (its trainer log has the `step` lines)
    replica_forms: str  # for messages: how replicas are named
    replica_pattern: str  # a regex matching exactly those names
    # Where the controller records that admission refused a pod: (involvedObject kind, name, reason).
    refusal_event: tuple[str, str, str]
    product: str  # what an admin installs, for messages
    install: str  # how

    @property
    def kind(self) -> str:
        return self.resource.kind

    def pod_selector(self, run: str) -> str:
        return f"{self.pod_label}={run}"

    def state(self, job: dict[str, Any]) -> str:
        """Succeeded or Failed when the API's success or failure condition is True anywhere in the list
        (not only the last one), else the newest True condition, else Pending."""
        true = [c for c in _conditions(job) if c.get("status") == "True"]
        for final, name in ((self.succeeded, "Succeeded"), (self.failed, "Failed")):
            if any(c.get("type") == final for c in true):
                return name
        return true[-1]["type"] if true else "Pending"

    def condition_message(self, job: dict[str, Any], state: str) -> str:
        ctype = {"Succeeded": self.succeeded, "Failed": self.failed}.get(state, state)
        return next(
            (c["message"] for c in _conditions(job) if c.get("type") == ctype and c.get("message")), ""
        )

    @abstractmethod
    def nodes(self, job: dict[str, Any]) -> int: ...

    @abstractmethod
    def replica_statuses(self, job: dict[str, Any]) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def pod_of(self, run: str, replica: str, pods: Pods) -> str | None:
        """The name of the replica's current pod (``pods`` lists the job's pods, called only if needed)."""

    @abstractmethod
    def logs_command(self, namespace: str, run: str) -> str: ...


class PyTorchJobApi(JobApi):
    def nodes(self, job: dict[str, Any]) -> int:
        specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        return sum(int(s.get("replicas", 1)) for s in specs.values())

    def replica_statuses(self, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return (job.get("status") or {}).get("replicaStatuses") or {}

    def pod_of(self, run: str, replica: str, pods: Pods) -> str | None:
        # The operator names pods <job>-<replica type>-<index>, and reuses the name when it recreates one.
        return f"{run}-{replica}"

    def logs_command(self, namespace: str, run: str) -> str:
        return f"kubectl logs -n {namespace} -f {run}-{self.primary_replica} -c {self.trainer_container}"


# The Job controller's annotation on each pod of an Indexed Job (JobSet's replicated jobs are Indexed):
# Trainer's torch plugin reads PET_NODE_RANK from it.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class TrainJobApi(JobApi):
    def nodes(self, job: dict[str, Any]) -> int:
        return int(((job.get("spec") or {}).get("trainer") or {}).get("numNodes") or 1)

    def state(self, job: dict[str, Any]) -> str:
        # A TrainJob has no Running condition (Created, Suspended, Complete, Failed): a child Job whose pods
        # are all ready says it.
        state = super().state(job)
        if state in ("Succeeded", "Failed", "Suspended"):
            return state
        ready = any((j.get("ready") or 0) > 0 for j in (job.get("status") or {}).get("jobsStatus") or [])
        return "Running" if ready else state

    def replica_statuses(self, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            j["name"]: {k: j[k] for k in ("active", "ready", "succeeded", "failed", "suspended") if k in j}
            for j in (job.get("status") or {}).get("jobsStatus") or []
        }

    def pod_of(self, run: str, replica: str, pods: Pods) -> str | None:
        # JobSet names pods <jobset>-node-0-<index>-<random> (a new name for each new pod): find the
        # newest one of that completion index.
        index = replica.rpartition("-")[2]
        mine = [
            p
            for p in pods()
            if ((p.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX) == index
        ]
        if not mine:
            return None
        newest = max(mine, key=lambda p: (p["metadata"].get("deletionTimestamp") is None,
                                          p["metadata"].get("creationTimestamp") or ""))  # fmt: skip
        return newest["metadata"]["name"]

    def logs_command(self, namespace: str, run: str) -> str:
        selector = f"{self.pod_selector(run)},{COMPLETION_INDEX}=0"
        return f"kubectl logs -n {namespace} -f -l {selector} -c {self.trainer_container}"


PYTORCHJOB = PyTorchJobApi(
    name="pytorchjob",
    resource=Resource("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs"),
    runtime=None,
    succeeded="Succeeded",
    failed="Failed",
    pod_label="training.kubeflow.org/job-name",
    # The operator's webhook requires the name.
    trainer_container="pytorch",
    primary_replica="master-0",
    replica_forms="master-0, worker-0, worker-1, ...",
    replica_pattern=r"master-0|worker-\d+",
    refusal_event=("PyTorchJob", "{run}", "FailedCreatePod"),
    product="the training-operator (PyTorchJob, kubeflow.org/v1)",
    install='kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.8.1"',
)
# The runtime a TrainJob references. Cluster-scoped: the CRDs userloop ships (../shared/crds) have no
# namespaced TrainingRuntime, which a TrainJob could own (docs/launcher.md, "TrainJob").
CLUSTER_TRAINING_RUNTIME = Resource(
    "ClusterTrainingRuntime", "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", namespaced=False
)
TRAINJOB = TrainJobApi(
    name="trainjob",
    resource=Resource("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    runtime=CLUSTER_TRAINING_RUNTIME,
    # Trainer copies the JobSet's Completed condition as Complete (pkg/runtime/framework/plugins/jobset).
    succeeded="Complete",
    failed="Failed",
    # Set by the JobSet controller on every pod of the JobSet, which has the TrainJob's name.
    pod_label="jobset.sigs.k8s.io/jobset-name",
    # Trainer's torch plugin injects PET_* into, and TrainJob.spec.trainer applies to, the container `node`.
    trainer_container="node",
    primary_replica="node-0",
    replica_forms="node-0, node-1, ...",
    replica_pattern=r"node-\d+",
    # The Job controller's event on the JobSet's child Job <jobset>-<replicated job>-<job index>.
    refusal_event=("Job", "{run}-node-0", "FailedCreate"),
    product="Kubeflow Trainer v2 (TrainJob, trainer.kubeflow.org/v1alpha1)",
    install='kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"',
)
JOB_APIS: dict[str, JobApi] = {api.name: api for api in (PYTORCHJOB, TRAINJOB)}
# Every custom resource by kind, for create/get/delete.
CUSTOM_RESOURCES: dict[str, Resource] = {
    r.kind: r for api in JOB_APIS.values() for r in (api.resource, api.runtime) if r is not None
}


def api_of(job: dict[str, Any]) -> JobApi:
    """The API of a job object (PyTorchJob when it has no kind, as in a bare status dict)."""
    return next((a for a in JOB_APIS.values() if a.kind == job.get("kind")), PYTORCHJOB)


def api_of_replica(replica: str) -> JobApi | None:
    """The API whose replicas are named like ``replica`` (the two namings are disjoint)."""
    return next((a for a in JOB_APIS.values() if re.fullmatch(a.replica_pattern, replica)), None)


def _conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])
