"""The launcher against a real kube-apiserver (v1.20.2 + etcd on loopback; tests/launcher/kube_apiserver.py).

The server is the reference: its admission, dry run, conflicts, pruning, subresources, field selectors
and RBAC authorizer are the real ones. It runs no controllers, so the tests play the training-operator
and the kubelet through the status subresources (launcher_operator.py); pod logs need a kubelet and are
tested against the double (test_launcher_cluster.py). Skipped, with the reason, where etcd or the
binary is missing.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_apiserver import KubeApiserver, collection, wait_established
from launcher_operator import Operator, running, terminated, waiting
from launcher_paths import DATA, REPO
from typer.testing import CliRunner

import launcher.values
from launcher import checks, runs
from launcher.cli import app
from launcher.cluster import Cluster
from launcher.pruned import dropped_paths
from launcher.render import Rendered, render
from trainer.config import load_config
from trainer.errors import UserError

runner = CliRunner()
CONFIG = str(DATA / "sidecar.yaml")
NS = "userloop"
# Pinned, non-placeholder images: what a real submission carries.
IMAGES = ["cluster.image=registry.example.com/team/userloop-trainer:0.1.0",
          "cluster.sglang_image=registry.example.com/team/userloop-sglang:v0.5.19-cu129"]  # fmt: skip
SET_IMAGES = [arg for image in IMAGES for arg in ("--set", image)]
FAST = ["--poll-interval", "0.02"]
MASTER = "Master"


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def new_run() -> str:
    return f"sidecar-{uuid.uuid4().hex[:8]}"


def rendered_run(run: str, *overrides: str) -> Rendered:
    return render(load_config(DATA / "sidecar.yaml", [*IMAGES, *overrides]), run)


def submit(kubeconfig: Path, run: str, *extra: str) -> Any:
    return invoke(
        "submit", CONFIG, *SET_IMAGES, "--kubeconfig", str(kubeconfig), "--run-name", run, *FAST, *extra
    )


def lines(result: Any) -> list[str]:
    return result.output.splitlines()


def play_when_created(op: Operator, script: Callable[[], None]) -> threading.Thread:
    """Run ``script`` (the operator's part) as soon as the launcher has created the job."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                op.get_job()
                break
            except urllib.error.HTTPError:
                time.sleep(0.02)
        script()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- submit


def test_submit_stores_exactly_what_was_rendered_and_the_job_owns_its_configmap(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    run = new_run()
    result = submit(admin_kubeconfig, run)
    assert result.exit_code == 0, result.output
    assert f"submitted {run} (namespace {NS})" in result.output
    job = kube_api.request("GET", f"{collection('PyTorchJob', NS)}/{run}")
    # The real CRD copy keeps every field of the chart, the native sidecar's restartPolicy included.
    assert dropped_paths(rendered_run(run).job, job) == []
    (sidecar,) = job["spec"]["pytorchReplicaSpecs"][MASTER]["template"]["spec"]["initContainers"]
    assert sidecar["name"] == "sglang" and sidecar["restartPolicy"] == "Always"
    cm = kube_api.request("GET", f"/api/v1/namespaces/{NS}/configmaps/{run}-config")
    assert cm["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": run, "uid": job["metadata"]["uid"]}
    ]


def test_a_taken_run_name_exits_2_and_creates_nothing(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    run = new_run()
    assert submit(admin_kubeconfig, run).exit_code == 0
    first = kube_api.request("GET", f"{collection('PyTorchJob', NS)}/{run}")["metadata"]["uid"]
    again = submit(admin_kubeconfig, run)
    assert again.exit_code == 2, again.output
    assert f"the run name {run} is taken (nothing of the run was created)" in again.output
    assert "--run-name" in again.output and "Traceback" not in again.output
    assert kube_api.request("GET", f"{collection('PyTorchJob', NS)}/{run}")["metadata"]["uid"] == first


def test_a_generated_name_that_is_taken_is_replaced_by_a_fresh_one(
    kube_api: KubeApiserver, admin_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken, fresh = new_run(), new_run()
    kube_api.request("POST", f"/api/v1/namespaces/{NS}/configmaps",
                     {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{taken}-config"}})  # fmt: skip
    names = iter([taken, fresh])
    monkeypatch.setattr(launcher.values, "run_name", lambda cfg: next(names))
    result = invoke("submit", CONFIG, *SET_IMAGES, "--kubeconfig", str(admin_kubeconfig))
    assert result.exit_code == 0, result.output
    assert f"submitted {fresh}" in result.output
    kube_api.request("GET", f"{collection('PyTorchJob', NS)}/{fresh}")
    with pytest.raises(urllib.error.HTTPError) as gone:
        kube_api.request("GET", f"{collection('PyTorchJob', NS)}/{taken}")
    assert gone.value.code == 404


def test_submit_to_a_missing_namespace_says_which(admin_kubeconfig: Path) -> None:
    result = submit(admin_kubeconfig, new_run(), "-n", "no-such-ns")
    assert result.exit_code == 2, result.output
    assert (
        'rejected it in a dry run (nothing was created): 404 Not Found: namespaces "no-such-ns" not found'
        in result.output
    )
    assert "Hint: namespace no-such-ns does not exist" in result.output
    assert "training-operator" not in result.output  # the generic 404 hint would send the user there


def test_a_dry_run_refused_for_lack_of_rights_is_a_cluster_error(
    kube_api: KubeApiserver, tmp_path: Path
) -> None:
    # An account that may read the shared objects but not create the run's: the dry run is refused.
    name = f"reader-{uuid.uuid4().hex[:6]}"
    rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/userloop"
    kube_api.request(
        "POST",
        collection("ServiceAccount", NS),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )
    kube_api.request(
        "POST",
        f"{rbac}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}],
        },
    )
    kube_api.request("POST", f"{rbac}/rolebindings", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                     "metadata": {"name": name}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                     "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]})  # fmt: skip
    kubeconfig = kube_api.kubeconfig(
        tmp_path / "kc", token=kube_api.service_account_token(NS, name), namespace=NS
    )
    result = submit(kubeconfig, new_run())
    assert result.exit_code == 1, result.output  # a refused account, not a rejected manifest (2)
    assert 'cannot create resource "configmaps" in API group "" in the namespace "userloop"' in result.output
    assert "rejected it in a dry run" not in result.output and "k8s/rbac-ci.yaml" in result.output


def _bogus_container_field(r: Rendered) -> tuple[dict[str, Any], str]:
    r.job["spec"]["pytorchReplicaSpecs"][MASTER]["template"]["spec"]["containers"][0]["bogus"] = "x"
    return r.job, "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].bogus"


def _bogus_configmap_field(r: Rendered) -> tuple[dict[str, Any], str]:
    cm = r.by_kind("ConfigMap")[0]
    cm["bogus"] = {"a": 1}
    return cm, "bogus"


@pytest.mark.parametrize("edit", [_bogus_container_field, _bogus_configmap_field], ids=["job", "configmap"])
def test_fields_the_server_prunes_are_named_and_nothing_is_created(
    kube_api: KubeApiserver, admin_kubeconfig: Path, edit: Callable[[Rendered], tuple[dict[str, Any], str]]
) -> None:
    run = new_run()
    r = rendered_run(run)
    obj, path = edit(r)
    cluster = Cluster(kubeconfig=str(admin_kubeconfig), namespace=NS)
    # The premise: this server accepts the object (201, no warning) and drops the field.
    assert dropped_paths(obj, cluster.create(obj, dry_run=True)) == [path]
    with pytest.raises(UserError) as err:
        runs.submit(cluster, r, say=lambda _: None)
    assert err.value.exit_code == 2
    assert "would silently drop 1 field(s) it does not know (nothing was created)" in str(err.value)
    assert path in str(err.value)
    assert cluster.get_job(run) is None and cluster.get("ConfigMap", f"{run}-config") is None


@pytest.fixture
def old_crd(kube_api: KubeApiserver) -> Iterator[None]:
    """The PyTorchJob CRD as training-operator < v1.8 had it (init containers without restartPolicy),
    for one test; the session's CRD is put back afterwards."""
    path = collection("CustomResourceDefinition") + "/pytorchjobs.kubeflow.org"
    job = rendered_run(new_run()).job

    def replace(edit: Callable[[dict[str, Any]], None], prunes: bool) -> None:
        crd = kube_api.request("GET", path)
        edit(crd)
        kube_api.request("PUT", path, crd)
        wait_established(kube_api)
        # The CRD stays Established across an update, and the new schema is served a moment later: wait
        # until a dry run shows it (bounded), so that neither this test nor the next one sees the other's.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = kube_api.request("POST", collection("PyTorchJob", NS) + "?dryRun=All", job)
            if bool(dropped_paths(job, answer)) == prunes:
                return
            time.sleep(0.1)
        raise TimeoutError("the updated PyTorchJob CRD was not served in time")

    def drop_restart_policy(crd: dict[str, Any]) -> None:
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        replica = schema["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]["additionalProperties"]
        init = replica["properties"]["template"]["properties"]["spec"]["properties"]["initContainers"]
        del init["items"]["properties"]["restartPolicy"]

    original = yaml.safe_load(checks.CRD_PATH.read_text())
    replace(drop_restart_policy, prunes=True)
    try:
        yield
    finally:
        replace(lambda crd: crd["spec"].update(copy.deepcopy(original["spec"])), prunes=False)


def test_an_old_crd_that_drops_native_sidecars_stops_submit(
    kube_api: KubeApiserver, admin_kubeconfig: Path, old_crd: None
) -> None:
    run = new_run()
    cluster = Cluster(kubeconfig=str(admin_kubeconfig), namespace=NS)
    result = submit(admin_kubeconfig, run)
    assert result.exit_code == 2, result.output
    assert "spec.pytorchReplicaSpecs.Master.template.spec.initContainers[0].restartPolicy" in result.output
    assert "predates training-operator v1.8 and drops native sidecars" in result.output
    assert cluster.get_job(run) is None and cluster.get("ConfigMap", f"{run}-config") is None
    doctor = invoke("doctor", "--kubeconfig", str(admin_kubeconfig))
    assert "✗ PyTorchJob CRD predates training-operator v1.8" in doctor.output and doctor.exit_code == 1


# ----------------------------------------------------------------------------- wait, with the operator


def _submitted(kube_api: KubeApiserver, kubeconfig: Path) -> tuple[str, Cluster, Operator]:
    run = new_run()
    cluster = Cluster(kubeconfig=str(kubeconfig), namespace=NS)
    runs.submit(cluster, rendered_run(run), say=lambda _: None)
    return run, cluster, Operator(kube_api, NS, run)


def test_wait_follows_the_operator_through_a_restart_as_a_new_pod(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    run, cluster, op = _submitted(kube_api, admin_kubeconfig)
    pod = f"{run}-master-0"
    seen: dict[str, Any] = {}

    def restart() -> None:
        seen["old_uid"] = op.pod(pod)["metadata"]["uid"]
        op.fail_and_restart(pod, 137, "OOMKilled")
        seen["status"] = runs.status(cluster, run)

    steps = iter([
        lambda: (op.condition("Created"), op.create_pod()),
        lambda: (op.pod_status(pod, "Running", [running("pytorch")], [running("sglang")]), op.condition("Running")),
        restart,
        lambda: (op.pod_status(pod, "Running", [running("pytorch")], [running("sglang")]), op.condition("Running")),
        lambda: (op.pod_status(pod, "Succeeded", [terminated("pytorch", 0, "Completed")]), op.condition("Succeeded")),
    ])  # fmt: skip
    out: list[str] = []
    code = runs.wait(cluster, run, timeout=60, say=out.append, sleep=lambda _: next(steps)())
    assert code == 0, out
    assert out == [
        f"{run}: {s}" for s in ("Pending", "Created", "Running", "Restarting", "Running", "Succeeded")
    ]
    # Mid-restart, as the operator leaves it: a new pod (new uid, restartCount 0), the job Restarting.
    status = seen["status"]
    assert status["state"] == "Restarting"
    assert [p["name"] for p in status["pods"]] == [pod] and status["pods"][0]["restarts"] == 0
    assert op.pod(pod)["metadata"]["uid"] != seen["old_uid"]
    assert [c["type"] for c in status["conditions"]] == ["Created", "Restarting"]


def test_wait_exits_1_on_failed_with_the_pods_exit_code_and_reason(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    run, cluster, op = _submitted(kube_api, admin_kubeconfig)
    pod = f"{run}-master-0"
    steps = iter([
        lambda: (op.condition("Created"), op.create_pod(), op.condition("Running")),
        lambda: (op.pod_status(pod, "Failed", [terminated("pytorch", 2, "Error", "ValueError: boom\n")]),
                 op.condition("Failed", f"PyTorchJob {run} is failed because 1 Master replica(s) failed.")),
    ])  # fmt: skip
    out: list[str] = []
    code = runs.wait(cluster, run, timeout=60, say=out.append, sleep=lambda _: next(steps)())
    assert code == 1, out
    assert f"{run}: Failed" in out
    assert f"{run}: PyTorchJob {run} is failed because 1 Master replica(s) failed." in out
    assert f"{pod}/pytorch: exited 2 (Error): ValueError: boom" in out
    # No kubelet, so the server answers the log read with an empty log (200): the report has no log lines.
    assert not any(line.startswith(f"  [{pod}/pytorch]") for line in out), out


@pytest.mark.parametrize(("final", "code"), [("Succeeded", 0), ("Failed", 1)])
def test_submit_wait_exit_codes(
    kube_api: KubeApiserver, admin_kubeconfig: Path, final: str, code: int
) -> None:
    run = new_run()
    op = Operator(kube_api, NS, run)
    pod = f"{run}-master-0"
    exit_code = 0 if final == "Succeeded" else 2

    def script() -> None:
        op.condition("Created")
        op.create_pod()
        op.pod_status(
            pod, final, [terminated("pytorch", exit_code, "Completed" if exit_code == 0 else "Error")]
        )
        op.condition(final)

    thread = play_when_created(op, script)
    result = submit(admin_kubeconfig, run, "--wait", "--timeout", "30")
    thread.join(10)
    assert result.exit_code == code, result.output
    assert f"{run}: {final}" in lines(result)


def test_wait_timeout_turns_scheduling_events_and_stuck_pods_into_actions(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    run = new_run()
    op = Operator(kube_api, NS, run)
    pod = f"{run}-master-0"

    def script() -> None:
        op.condition("Created")
        op.create_pod()
        op.pod_status(
            pod,
            "Pending",
            [waiting("pytorch", "CreateContainerConfigError", 'secret "userloop-api-key" not found')],
        )
        op.event(pod, "FailedScheduling", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
        op.event(pod, "Pulled", "an event of another reason, which the report skips")  # fmt: skip

    thread = play_when_created(op, script)
    result = submit(admin_kubeconfig, run, "--wait", "--timeout", "2")
    thread.join(10)
    assert result.exit_code == 124, result.output
    out = result.output
    assert f"{pod}: not scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in out
    assert "kubectl describe nodes" in out
    assert out.count("CreateContainerConfigError") == 1 and "cluster.api_key_secret" in out


def test_a_missing_priority_class_is_found_by_doctor_and_reported_by_wait(
    kube_api: KubeApiserver, admin_kubeconfig: Path
) -> None:
    # The job is accepted (and its dry run passes), but the Priority admission plugin refuses every pod.
    run = new_run()
    op = Operator(kube_api, NS, run)
    pc = ["--set", "cluster.priority_class=missing-pc"]

    def script() -> None:
        op.condition("Created")
        assert op.create_pod() is None

    thread = play_when_created(op, script)
    result = submit(admin_kubeconfig, run, *pc, "--wait", "--timeout", "2")
    thread.join(10)
    assert result.exit_code == 124, result.output
    assert (
        f'{run}: the operator cannot create its pods: Error creating: pods "{run}-master-0" is forbidden: '
        "no PriorityClass with name missing-pc was found -> fix cluster.priority_class" in result.output
    )
    doctor = lines(invoke("doctor", CONFIG, *SET_IMAGES, *pc, "--kubeconfig", str(admin_kubeconfig)))
    assert (
        "✗ PriorityClass missing-pc does not exist (every pod of the run would be refused) -> "
        "`kubectl get priorityclasses` lists them: fix cluster.priority_class" in doctor
    ), doctor


# ----------------------------------------------------------------------------- status, list, delete


def test_status_list_and_delete(kube_api: KubeApiserver, admin_kubeconfig: Path) -> None:
    run, cluster, op = _submitted(kube_api, admin_kubeconfig)
    op.condition("Created")
    op.create_pod()
    op.pod_status(f"{run}-master-0", "Running", [running("pytorch")], [running("sglang")])
    op.condition("Running")
    # A pod with the same job label in another namespace is not this run's.
    kube_api.request(
        "POST",
        collection("Namespace"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"o-{run}"}},
    )
    kube_api.request("POST", collection("Pod", f"o-{run}"), {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{run}-master-0", "labels": {"training.kubeflow.org/job-name": run}},
        "spec": {"containers": [{"name": "pytorch", "image": "img:1"}]}})  # fmt: skip
    kc = ["-n", NS, "--kubeconfig", str(admin_kubeconfig)]
    status = invoke("status", run, *kc, "--output", "json")
    assert status.exit_code == 0, status.output
    info = json.loads(status.output)
    assert info["state"] == "Running" and info["config"] == "sidecar" and info["namespace"] == NS
    assert info["pods"] == [{"name": f"{run}-master-0", "phase": "Running", "restarts": 0,
                             "containers": {"sglang": "running", "pytorch": "running"}}]  # fmt: skip
    assert info["last_metrics"] is None  # no kubelet, no log: status still answers
    text = invoke("status", run, *kc)
    assert f"{run}: Running (namespace {NS}" in text.output and f"pod {run}-master-0: Running" in text.output
    # A job without our labels is not listed.
    kube_api.request("POST", collection("PyTorchJob", NS), {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                     "metadata": {"name": f"x-{run}"}, "spec": {"pytorchReplicaSpecs": {}}})  # fmt: skip
    rows = json.loads(invoke("list", *kc, "--output", "json").output)
    names = [r["name"] for r in rows]
    assert run in names and f"x-{run}" not in names
    assert next(r for r in rows if r["name"] == run) | {"created": None} == {
        "name": run, "config": "sidecar", "state": "Running", "nodes": 1, "created": None}  # fmt: skip
    created = [r["created"] for r in rows]
    assert created == sorted(created, reverse=True)
    deleted = invoke("delete", run, *kc)
    assert deleted.exit_code == 0 and f"deleted {run}" in deleted.output
    assert cluster.get_job(run) is None and cluster.get("ConfigMap", f"{run}-config") is None
    again = invoke("delete", run, *kc)
    assert again.exit_code == 1 and f"Error: PyTorchJob/{run}: not found" in again.output


def test_status_of_an_unknown_run_exits_1(admin_kubeconfig: Path) -> None:
    result = invoke("status", "nope", "-n", NS, "--kubeconfig", str(admin_kubeconfig))
    assert (
        result.exit_code == 1 and "Error: PyTorchJob/nope: not found in namespace userloop" in result.output
    )


# ----------------------------------------------------------------------------- doctor


def test_doctor_without_and_with_the_secret_and_pvc(kube_api: KubeApiserver, admin_kubeconfig: Path) -> None:
    ns = f"doc-{uuid.uuid4().hex[:6]}"
    args = ["doctor", CONFIG, *SET_IMAGES, "-n", ns, "--kubeconfig", str(admin_kubeconfig)]
    missing = invoke(*args)
    assert missing.exit_code == 1
    out = lines(missing)
    assert out[1] == "✓ PyTorchJob CRD installed and keeps native sidecars (training-operator >= v1.8)"
    assert f"✗ namespace {ns} does not exist -> kubectl apply -f k8s/namespace.yaml" in out
    assert any(line.startswith("✗ Secret userloop-api-key is missing") for line in out), out
    assert any(line.startswith("✗ PVC userloop-runs does not exist") for line in out), out
    assert any(
        line.startswith("✗ 0 node(s) matching nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3") for line in out
    )

    kube_api.request(
        "POST", collection("Namespace"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    kube_api.request("POST", collection("Secret", ns), {"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": "userloop-api-key"}, "stringData": {"api-key": "s3cret-value"}})  # fmt: skip
    pvc = yaml.safe_load((REPO / "k8s" / "pvc-rwx.yaml").read_text())
    pvc["metadata"]["namespace"] = ns
    kube_api.request("POST", collection("PersistentVolumeClaim", ns), pvc)
    pending = lines(invoke(*args))
    assert "? PVC userloop-runs is Pending -> normal for WaitForFirstConsumer storage classes" in pending
    # A provisioner binds it; a GPU node with the config's label joins (the kubelet writes its status).
    kube_api.request("PATCH", f"{collection('PersistentVolumeClaim', ns)}/userloop-runs/status",
                     {"status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}},
                     content_type="application/merge-patch+json")  # fmt: skip
    node = f"gpu-{ns}"
    kube_api.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                     "metadata": {"name": node, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}})  # fmt: skip
    kube_api.request("PATCH", f"/api/v1/nodes/{node}/status",
                     {"status": {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8"}}},
                     content_type="application/merge-patch+json")  # fmt: skip
    try:
        ready = invoke(*args)
    finally:
        kube_api.request("DELETE", f"/api/v1/nodes/{node}")
    assert ready.exit_code == 0, ready.output
    assert all(line.startswith("✓") for line in lines(ready)), ready.output
    assert "Secret userloop-api-key has key api-key" in ready.output and "s3cret" not in ready.output
    assert "✓ PriorityClass high exists" in lines(ready)


# ----------------------------------------------------------------------------- RBAC of k8s/rbac-ci.yaml


@pytest.fixture(scope="module")
def ci_token(kube_api: KubeApiserver) -> str:
    """k8s/rbac-ci.yaml and k8s/pvc-rwx.yaml applied by the admin, and a token for the ServiceAccount
    from the TokenRequest API: what `kubectl create token userloop-ci` hands CI (k8s/README.md)."""
    for name in ("rbac-ci.yaml", "pvc-rwx.yaml"):
        for obj in yaml.safe_load_all((REPO / "k8s" / name).read_text()):
            try:
                kube_api.request("POST", collection(obj["kind"], obj["metadata"]["namespace"]), obj)
            except urllib.error.HTTPError as e:
                if e.code != 409:  # the PVC may exist from another test
                    raise
    return kube_api.service_account_token(NS, "userloop-ci")


@pytest.fixture
def ci_kubeconfig(kube_api: KubeApiserver, ci_token: str, tmp_path: Path) -> Path:
    return kube_api.kubeconfig(tmp_path / "ci-kubeconfig", token=ci_token, namespace=NS)


def test_the_ci_account_can_submit_wait_status_list_and_delete(
    kube_api: KubeApiserver, ci_kubeconfig: Path
) -> None:
    run = new_run()
    op = Operator(kube_api, NS, run)
    pod = f"{run}-master-0"

    def script() -> None:
        op.condition("Created")
        op.create_pod()
        op.pod_status(pod, "Running", [running("pytorch")], [running("sglang")])
        op.condition("Running")
        time.sleep(0.2)
        op.pod_status(pod, "Succeeded", [terminated("pytorch", 0, "Completed")])
        op.condition("Succeeded")

    thread = play_when_created(op, script)
    result = submit(ci_kubeconfig, run, "--wait", "--timeout", "30")
    thread.join(10)
    assert result.exit_code == 0, result.output
    assert f"{run}: Succeeded" in lines(result)
    kc = ["-n", NS, "--kubeconfig", str(ci_kubeconfig)]
    assert invoke("status", run, *kc).exit_code == 0
    assert run in invoke("list", *kc).output
    # pods/log is granted (the pod has no node, so the server's answer is an empty log).
    logs = invoke("logs", run, *kc)
    assert logs.exit_code == 0 and logs.output == ""
    assert invoke("delete", run, *kc).exit_code == 0


# What launcher/cluster.py calls (test_launcher_assets.py keeps this list and the Role in step).
ALLOWED = [
    ("create", "kubeflow.org", "pytorchjobs", ""), ("get", "kubeflow.org", "pytorchjobs", ""),
    ("list", "kubeflow.org", "pytorchjobs", ""), ("delete", "kubeflow.org", "pytorchjobs", ""),
    ("create", "", "configmaps", ""), ("patch", "", "configmaps", ""), ("delete", "", "configmaps", ""),
    ("get", "", "pods", ""), ("list", "", "pods", ""), ("get", "", "pods/log", ""), ("list", "", "events", ""),
    ("get", "", "serviceaccounts", ""), ("get", "", "persistentvolumeclaims", ""),
    ("get", "", "secrets", "userloop-api-key"),
]  # fmt: skip
REFUSED = [
    ("list", "", "secrets", ""), ("get", "", "secrets", "another-secret"), ("create", "", "secrets", ""),
    ("get", "", "configmaps", ""), ("list", "", "configmaps", ""), ("update", "", "configmaps", ""),
    ("patch", "kubeflow.org", "pytorchjobs", ""), ("update", "kubeflow.org", "pytorchjobs", ""),
    ("patch", "kubeflow.org", "pytorchjobs/status", ""), ("watch", "kubeflow.org", "pytorchjobs", ""),
    ("create", "", "pods/exec", ""), ("create", "", "serviceaccounts", ""),
    ("create", "", "persistentvolumeclaims", ""), ("create", "rbac.authorization.k8s.io", "roles", ""),
]  # fmt: skip


def _allowed(server: KubeApiserver, token: str, verb: str, group: str, resource: str, name: str,
             namespace: str = NS) -> bool:  # fmt: skip
    resource, _, sub = resource.partition("/")
    attrs = {
        "namespace": namespace,
        "verb": verb,
        "group": group,
        "resource": resource,
        "subresource": sub,
        "name": name,
    }
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs},
    }
    answer = server.request(
        "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review, token=token
    )
    return answer["status"]["allowed"]


def test_the_ci_account_is_refused_everything_else(
    kube_api: KubeApiserver, ci_token: str, ci_kubeconfig: Path
) -> None:
    # Asked of the real RBAC authorizer, as the ServiceAccount itself.
    assert [a for a in ALLOWED if not _allowed(kube_api, ci_token, *a)] == []
    assert [r for r in REFUSED if _allowed(kube_api, ci_token, *r)] == []
    assert [a for a in ALLOWED if _allowed(kube_api, ci_token, *a, namespace="default")] == []
    # A refusal, as the launcher reports it: the server names the verb and resource, the hint the Role.
    result = invoke("list", "-n", "default", "--kubeconfig", str(ci_kubeconfig))
    assert result.exit_code == 1
    error, hint = lines(result)
    assert error.startswith("Error: list PyTorchJobs: 403 Forbidden:"), error
    assert (
        'cannot list resource "pytorchjobs" in API group "kubeflow.org" in the namespace "default"' in error
    )
    assert "k8s/rbac-ci.yaml" in hint
    # doctor: what a namespaced account cannot read is "?" (not checkable), not a failure.
    doctor = lines(invoke("doctor", CONFIG, *SET_IMAGES, "--kubeconfig", str(ci_kubeconfig)))
    assert doctor[1].startswith("? get the PyTorchJob CRD: 403 Forbidden"), doctor
    assert f"? namespace {NS}: not allowed to read namespaces -> ask an admin, or ignore" in doctor
    assert any(line.startswith("? GPU nodes: list nodes: 403 Forbidden") for line in doctor), doctor
    assert "? PriorityClass high: not allowed to read PriorityClasses -> ask an admin, or ignore" in doctor
    assert any(line.startswith("✗ Secret userloop-api-key is missing") for line in doctor), doctor
