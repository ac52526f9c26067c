"""Cluster operations against the local HTTP test double (tests/launcher/launcher_k8s_double.py).

These exercise the real ``kubernetes`` client over HTTP: dry-run-then-create, owner references,
condition handling and exit codes of --wait, log reconnection of --follow, status/list/delete and
doctor. What a real API server, kubelet or operator would do beyond the double is not covered here
(docs/launcher.md says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from launcher_k8s_double import Generation, K8sDouble
from launcher_paths import DATA
from typer.testing import CliRunner

from launcher import checks, runs
from launcher.cli import app
from launcher.cluster import Cluster
from launcher.render import render
from trainer.config import load_config

runner = CliRunner()
CONFIG = str(DATA / "sidecar.yaml")
RUN = "sidecar-020304ab"
FAST = ["--poll-interval", "0.01"]


def cond(*types: str, final_status: str = "True") -> list[dict[str, Any]]:
    out = [{"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": f"job is {t.lower()}",
            "lastTransitionTime": "2025-01-02T03:04:05Z", "lastUpdateTime": "2025-01-02T03:04:05Z"} for t in types]  # fmt: skip
    for c in out[:-1]:
        c["status"] = "False"  # earlier conditions flip to False, as the operator does for Running
    out[-1]["status"] = final_status
    return out


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def submit(kubeconfig: Path, *extra: str) -> Any:
    return invoke("submit", CONFIG, "--kubeconfig", str(kubeconfig), "--run-name", RUN, *FAST, *extra)


# ----------------------------------------------------------------------------- submit


def test_submit_dry_runs_everything_then_creates_and_owns_the_configmap(
    double: K8sDouble, kubeconfig: Path
) -> None:
    result = submit(kubeconfig)
    assert result.exit_code == 0, result.output
    assert f"submitted {RUN} (namespace userloop)" in result.output
    assert f"kubectl logs -n userloop -f {RUN}-master-0 -c pytorch" in result.output
    posts = double.calls("POST")
    ns = "/api/v1/namespaces/userloop"
    job_path = "/apis/kubeflow.org/v1/namespaces/userloop/pytorchjobs"
    assert posts == [
        f"POST {ns}/serviceaccounts dry-run",
        f"POST {ns}/configmaps dry-run",
        f"POST {job_path} dry-run",
        f"POST {ns}/serviceaccounts",
        f"POST {ns}/configmaps",
        f"POST {job_path}",
    ]
    assert all(q.get("fieldValidation") == ["Strict"] for m, _, q in double.requests if m == "POST")
    (job,) = double.created("PyTorchJob")
    (cm,) = double.created("ConfigMap")
    assert cm["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": RUN, "uid": job["metadata"]["uid"]}
    ]
    # What the double stores validates against the real schemas (it is what a server would have accepted).
    assert checks.crd_problems(job) == [] and checks.schema_problems([cm], "1.33") == []


def test_submit_skips_shared_objects_that_exist(double: K8sDouble, kubeconfig: Path) -> None:
    double.add_object(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "userloop", "namespace": "userloop"},
        }
    )
    assert submit(kubeconfig).exit_code == 0
    assert not any("serviceaccounts" in c for c in double.calls("POST"))


def test_a_rejected_dry_run_creates_nothing_and_exits_2(double: K8sDouble, kubeconfig: Path) -> None:
    cfg = load_config(DATA / "sidecar.yaml")
    rendered = render(cfg, RUN)
    rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["bogus"] = 1
    cluster = Cluster(kubeconfig=str(kubeconfig), namespace="userloop")
    with pytest.raises(Exception) as err:
        runs.submit(cluster, rendered, say=lambda _: None)
    assert getattr(err.value, "exit_code", None) == 2
    assert "dry run" in str(err.value) and "bogus" in str(err.value)
    assert double.created("ConfigMap") == [] and double.created("PyTorchJob") == []


def test_dry_run_never_connects(double: K8sDouble, tmp_path: Path) -> None:
    result = invoke("submit", CONFIG, "--dry-run", "--kubeconfig", str(tmp_path / "missing"))
    assert result.exit_code == 0, result.output
    assert "kind: PyTorchJob" in result.output and "nothing was sent" in result.output
    assert double.requests == []


def test_submit_without_any_cluster_says_what_to_do() -> None:
    result = invoke("submit", CONFIG)
    assert result.exit_code == 2
    assert "Error: kubeconfig: no cluster configured" in result.output
    assert "Hint:" in result.output and "Traceback" not in result.output


def test_bad_config_fails_before_any_cluster_call(double: K8sDouble, kubeconfig: Path) -> None:
    result = submit(kubeconfig, "--set", "cluster.rollout_gpus_per_node=8")
    assert result.exit_code == 2
    assert "cluster: rollout_gpus_per_node (8) leaves no GPU" in result.output
    assert double.requests == []


# ----------------------------------------------------------------------------- wait


def test_wait_exits_0_on_succeeded_anywhere_in_the_conditions(double: K8sDouble, kubeconfig: Path) -> None:
    double.job_script[RUN] = [
        cond("Created"),
        cond("Created", "Running"),
        cond("Created", "Running", "Succeeded"),
    ]
    result = submit(kubeconfig, "--wait")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{RUN}: Running" in lines and f"{RUN}: Succeeded" in lines


def test_succeeded_counts_even_when_not_the_last_condition() -> None:
    conditions = cond("Created", "Running", "Succeeded")
    conditions.append({"type": "Running", "status": "False", "reason": "x", "message": ""})
    assert runs.job_state({"status": {"conditions": conditions}}) == "Succeeded"
    assert runs.job_state({"status": {}}) == "Pending"


def test_wait_exits_1_on_failed_with_reason_and_last_log_lines(double: K8sDouble, kubeconfig: Path) -> None:
    double.job_script[RUN] = [cond("Created", "Running"), cond("Created", "Running", "Failed")]
    double.add_pod(RUN, containers={"pytorch": [Generation([f"line {i}" for i in range(30)] + ["ValueError: boom"],
                                                           exit_code=2, reason="Error")]}, phase="Failed")  # fmt: skip
    result = submit(kubeconfig, "--wait")
    assert result.exit_code == 1, result.output
    assert f"{RUN}-master-0/pytorch: exited 2 (Error)" in result.output
    assert f"[{RUN}-master-0/pytorch] ValueError: boom" in result.output
    assert "line 5" not in result.output  # only the tail


def test_wait_exits_124_on_timeout_and_turns_events_into_actions(double: K8sDouble, kubeconfig: Path) -> None:
    double.job_script[RUN] = [cond("Created")]
    pod = double.add_pod(RUN, phase="Pending", containers={"pytorch": [Generation([])]})
    pod.events.append(
        {"reason": "FailedScheduling", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    )
    result = submit(kubeconfig, "--wait", "--timeout", "0.2")
    assert result.exit_code == 124, result.output
    assert "Insufficient nvidia.com/gpu" in result.output and "kubectl describe nodes" in result.output


def test_wait_reports_a_missing_secret_once(double: K8sDouble, kubeconfig: Path) -> None:
    double.job_script[RUN] = [cond("Created")]
    double.add_pod(RUN, waiting_reason="CreateContainerConfigError", containers={"pytorch": [Generation([])]})
    result = submit(kubeconfig, "--wait", "--timeout", "0.2")
    assert result.exit_code == 124
    assert result.output.count("CreateContainerConfigError") == 1
    assert "cluster.api_key_secret" in result.output


# ----------------------------------------------------------------------------- follow and logs


def test_follow_reconnects_without_repeats_and_across_restarts(double: K8sDouble, kubeconfig: Path) -> None:
    double.job_script[RUN] = [cond("Created", "Running")]
    first = Generation(["step 1/4 reward 0.1", "step 2/4 reward 0.2", "step 3/4 reward 0.3"], drop_after=2)
    pod = double.add_pod(RUN, containers={"pytorch": [first]})

    def restart() -> None:
        first.exit_code, first.reason = 137, "OOMKilled"
        second = Generation(["resumed from step_3", "step 4/4 reward 0.4"], exit_code=0)
        pod.containers["pytorch"].append(second)
        pod.on_stream_end["pytorch"] = lambda: double.job_script.__setitem__(
            RUN, [cond("Created", "Running", "Succeeded")]
        )

    pod.on_stream_end["pytorch"] = restart
    result = submit(kubeconfig, "--follow")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    steps = [line for line in out if line.startswith(("step", "resumed"))]
    assert steps == ["step 1/4 reward 0.1", "step 2/4 reward 0.2", "step 3/4 reward 0.3", "resumed from step_3",
                     "step 4/4 reward 0.4"]  # fmt: skip
    assert any("restarted (restart 1)" in line for line in out)


def test_timestamps_sort_even_with_trimmed_nanoseconds() -> None:
    assert runs._ts_key("2025-01-02T03:04:05.1Z") > runs._ts_key("2025-01-02T03:04:05.09Z")
    assert runs._ts_key("2025-01-02T03:04:06Z") > runs._ts_key("2025-01-02T03:04:05.999999999Z")


def test_logs_of_a_replica_and_container(double: K8sDouble, kubeconfig: Path) -> None:
    double.add_pod(
        RUN, "worker-0", containers={"pytorch": [Generation(["w"])], "sglang": [Generation(['{"a": 1}'])]}
    )
    result = invoke("logs", RUN, "--replica", "worker-0", "-c", "sglang", "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 0 and result.output == '{"a": 1}\n'  # a JSON-looking line stays text


# ----------------------------------------------------------------------------- status, list, delete


def test_status_json_has_conditions_pods_and_the_last_step_line(double: K8sDouble, kubeconfig: Path) -> None:
    assert submit(kubeconfig).exit_code == 0
    double.job_script[RUN] = [cond("Created", "Running")]
    double.add_pod(
        RUN,
        containers={
            "pytorch": [Generation(["loading", "step 1/9 reward 0.1", "step 2/9 reward 0.3", "eval"])]
        },
    )
    result = invoke("status", RUN, "-n", "userloop", "--kubeconfig", str(kubeconfig), "--output", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["state"] == "Running" and info["config"] == "sidecar"
    assert info["last_metrics"] == "step 2/9 reward 0.3"
    assert info["pods"][0]["containers"]["pytorch"] == "running"
    text = invoke("status", RUN, "-n", "userloop", "--kubeconfig", str(kubeconfig))
    assert f"{RUN}: Running" in text.output and "last: step 2/9" in text.output


def test_status_of_an_unknown_run_exits_1(double: K8sDouble, kubeconfig: Path) -> None:
    result = invoke("status", "nope", "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 1 and "Error: PyTorchJob/nope: not found" in result.output


def test_list_json_and_delete_cleans_up(double: K8sDouble, kubeconfig: Path) -> None:
    assert submit(kubeconfig).exit_code == 0
    double.add_object({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "other", "namespace": "userloop"},
                       "spec": {"pytorchReplicaSpecs": {}}})  # fmt: skip
    listed = invoke("list", "-n", "userloop", "--kubeconfig", str(kubeconfig), "--output", "json")
    rows = json.loads(listed.output)
    assert [r["name"] for r in rows] == [RUN] and rows[0]["nodes"] == 1
    plain = invoke("list", "-n", "userloop", "--kubeconfig", str(kubeconfig))
    assert plain.output.startswith(f"{RUN}\tsidecar\t")
    deleted = invoke("delete", RUN, "-n", "userloop", "--kubeconfig", str(kubeconfig))
    assert deleted.exit_code == 0
    assert double.created("PyTorchJob") == [double.objects[("PyTorchJob", "userloop", "other")]]
    assert double.created("ConfigMap") == []
    again = invoke("delete", RUN, "-n", "userloop", "--kubeconfig", str(kubeconfig))
    assert again.exit_code == 1 and "not found" in again.output


# ----------------------------------------------------------------------------- doctor


def _gpu_node(name: str, gpus: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "96", "memory": "1Ti"}}}  # fmt: skip


def test_doctor_all_good(double: K8sDouble, kubeconfig: Path) -> None:
    double.nodes = [_gpu_node("n1", 8)]
    double.add_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "userloop-api-key", "namespace": "userloop"},
                       "data": {"api-key": "c2VjcmV0"}})  # fmt: skip
    double.add_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": {"name": "userloop-runs", "namespace": "userloop"},
                       "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}},
                       "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}})  # fmt: skip
    result = invoke("doctor", CONFIG, "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 0, result.output
    assert all(line.startswith("✓") for line in result.output.splitlines()), result.output
    assert "c2VjcmV0" not in result.output and "keeps native sidecars" in result.output


def test_doctor_says_what_to_do(double: K8sDouble, kubeconfig: Path) -> None:
    double.crd = None
    double.nodes = [_gpu_node("n1", 4)]
    result = invoke("doctor", CONFIG, "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 1
    out = result.output
    assert "✗ PyTorchJob CRD (kubeflow.org) is not installed -> install the training-operator" in out
    assert (
        "✗ Secret userloop-api-key is missing" in out
        and "kubectl create secret generic userloop-api-key" in out
    )
    assert "✗ PVC userloop-runs does not exist" in out
    assert "✗ 0 node(s) matching nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 with >= 8" in out


def test_doctor_flags_an_old_crd(double: K8sDouble, kubeconfig: Path) -> None:
    assert double.crd is not None
    schema = double.crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    pod_spec = schema["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]["additionalProperties"]
    pod_spec = pod_spec["properties"]["template"]["properties"]["spec"]
    del pod_spec["properties"]["initContainers"]["items"]["properties"]["restartPolicy"]
    result = invoke("doctor", "--kubeconfig", str(kubeconfig))
    assert "predates training-operator v1.8" in result.output and result.exit_code == 1
