"""Plays the training-operator's (and the kubelet's) part on the real API server, which runs no controllers.

It writes what they write, through the same endpoints, as the admin (training-operator v1.8 sources):

- job conditions through the ``pytorchjobs/status`` subresource, with the operator's ``setCondition``
  rules (pkg/util/status.go): a changed condition moves to the end; Running and Restarting replace
  each other; Succeeded or Failed turn Running False; nothing changes once Failed;
- pods from the job's template: ``<job>-<replica>-<index>``, the operator's labels, a controller
  ownerReference to the job, and pod ``restartPolicy: Never`` for ``ExitCode`` (pkg/core SetRestartPolicy);
- container states through ``pods/status``, as a kubelet reports them;
- under ``ExitCode``, a failed pod whose ``pytorch`` container exited with a retryable code (130, 137,
  138, 143: pkg/util/train IsRetryableExitCode; every other code fails the job) is **deleted and
  created again** under the same name: a new uid, ``restartCount`` 0, and the earlier logs gone
  (pkg/controller.v1/common/pod.go ReconcilePods). Nothing restarts in place.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import uuid
from datetime import datetime, timezone
from typing import Any

from kube_apiserver import KubeApiserver, collection

RETRYABLE = (130, 137, 138, 143)
MERGE = "application/merge-patch+json"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def running(name: str) -> dict[str, Any]:
    return {"name": name, "ready": True, "started": True, "restartCount": 0, "image": "img:1", "imageID": "",
            "containerID": f"containerd://{uuid.uuid4().hex}", "state": {"running": {"startedAt": now()}}}  # fmt: skip


def terminated(name: str, code: int, reason: str, message: str = "") -> dict[str, Any]:
    term = {"exitCode": code, "reason": reason, "startedAt": now(), "finishedAt": now(),
            "containerID": f"containerd://{uuid.uuid4().hex}"}  # fmt: skip
    if message:
        term["message"] = message
    return {"name": name, "ready": False, "restartCount": 0, "image": "img:1", "imageID": "",
            "containerID": term["containerID"], "state": {"terminated": term}}  # fmt: skip


def waiting(name: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"name": name, "ready": False, "restartCount": 0, "image": "img:1", "imageID": "",
            "state": {"waiting": {"reason": reason, "message": message or reason}}}  # fmt: skip


class Operator:
    """The operator of one PyTorchJob in ``namespace``."""

    def __init__(self, server: KubeApiserver, namespace: str, job: str):
        self.server, self.ns, self.job = server, namespace, job
        self.job_path = f"{collection('PyTorchJob', namespace)}/{job}"

    # ------------------------------------------------------------------ the job

    def get_job(self) -> dict[str, Any]:
        return self.server.request("GET", self.job_path)

    def condition(self, ctype: str, message: str = "") -> None:
        job = self.get_job()
        status = job.get("status") or {}
        conditions = list(status.get("conditions") or [])
        if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
            return
        kept = []
        for c in conditions:
            if c["type"] == ctype or {c["type"], ctype} == {"Running", "Restarting"}:
                continue
            if ctype in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        kept.append({"type": ctype, "status": "True", "reason": f"PyTorchJob{ctype}",
                     "message": message or f"PyTorchJob {self.job} is {ctype.lower()}.",
                     "lastUpdateTime": now(), "lastTransitionTime": now()})  # fmt: skip
        status = {
            **status,
            "conditions": kept,
            "replicaStatuses": status.get("replicaStatuses") or {"Master": {}},
        }
        self.server.request("PATCH", f"{self.job_path}/status", {"status": status}, content_type=MERGE)

    # ------------------------------------------------------------------ pods

    def pod_path(self, pod: str) -> str:
        return f"{collection('Pod', self.ns)}/{pod}"

    def create_pod(self, replica: str = "Master", index: int = 0) -> dict[str, Any] | None:
        """The pod of one replica; None when admission refuses it (then, like the operator, an event)."""
        job = self.get_job()
        template = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"][replica]["template"])
        spec = template["spec"]
        spec["restartPolicy"] = "Never"  # what the operator sets for ExitCode
        for init in spec.get("initContainers") or []:
            # This v1.20 server predates native sidecars (1.28): it refuses probes on init containers and
            # drops their restartPolicy. A >= 1.29 server takes the template as it is.
            for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "restartPolicy"):
                init.pop(key, None)
        rtype = replica.lower()
        labels = {**(template.get("metadata") or {}).get("labels", {}),
                  "training.kubeflow.org/operator-name": "pytorchjob-controller",
                  "training.kubeflow.org/job-name": self.job,
                  "training.kubeflow.org/replica-type": rtype,
                  "training.kubeflow.org/replica-index": str(index)}  # fmt: skip
        if replica == "Master":
            labels["training.kubeflow.org/job-role"] = "master"
        owner = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": self.job,
                 "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}  # fmt: skip
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{self.job}-{rtype}-{index}", "namespace": self.ns, "labels": labels,
                            "annotations": (template.get("metadata") or {}).get("annotations", {}),
                            "ownerReferences": [owner]},
               "spec": spec}  # fmt: skip
        try:
            return self.server.request("POST", collection("Pod", self.ns), pod)
        except urllib.error.HTTPError as e:
            # What the operator does when admission refuses a pod: an event on the job, then a retry later.
            message = json.loads(e.body).get("message", "")  # type: ignore[attr-defined]
            self.job_event("FailedCreatePod", f"Error creating: {message}")
            return None

    def job_event(self, reason: str, message: str) -> None:
        job = self.get_job()
        involved = {"kind": "PyTorchJob", "name": self.job, "namespace": self.ns, "apiVersion": "kubeflow.org/v1",
                    "uid": job["metadata"]["uid"]}  # fmt: skip
        self._event(involved, reason, message, "pytorchjob-controller")

    def pod_status(self, pod: str, phase: str, containers: list[dict[str, Any]],
                   init: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        status: dict[str, Any] = {"phase": phase, "containerStatuses": containers}
        if init is not None:
            status["initContainerStatuses"] = init
        self.server.request("PATCH", f"{self.pod_path(pod)}/status", {"status": status}, content_type=MERGE)

    def pod(self, pod: str) -> dict[str, Any]:
        return self.server.request("GET", self.pod_path(pod))

    def fail_and_restart(self, pod: str, code: int = 137, reason: str = "OOMKilled") -> dict[str, Any]:
        """The kubelet reports the trainer's exit; the operator deletes the pod and creates it again."""
        assert code in RETRYABLE, f"exit {code} fails the job under ExitCode; it does not restart"
        self.pod_status(pod, "Failed", [terminated("pytorch", code, reason)])
        self.server.request("DELETE", f"{self.pod_path(pod)}?gracePeriodSeconds=0")
        self.condition(
            "Restarting", f"PyTorchJob {self.job} is restarting because 1 Master replica(s) failed."
        )
        return self.create_pod()

    def event(self, pod: str, reason: str, message: str) -> None:
        """An event about a pod, as the scheduler records one."""
        involved = {"kind": "Pod", "name": pod, "namespace": self.ns, "apiVersion": "v1"}
        self._event(involved, reason, message, "default-scheduler")

    def _event(self, involved: dict[str, Any], reason: str, message: str, component: str) -> None:
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:8]}", "namespace": self.ns},
                "involvedObject": involved, "reason": reason, "message": message, "type": "Warning", "count": 1,
                "firstTimestamp": now(), "lastTimestamp": now(), "source": {"component": component}}  # fmt: skip
        self.server.request("POST", f"/api/v1/namespaces/{self.ns}/events", body)
