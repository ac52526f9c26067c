"""What needs running pods and their logs, against the local HTTP test double (launcher_k8s_double.py).

The real ``kubernetes`` client over HTTP: the order of dry runs and creates, failure reports with log
lines, ``--follow`` across dropped streams, in-place restarts and pods the operator recreates, ``logs``
and the last ``step`` line of ``status``. Everything a real API server can answer (admission, dry run,
conflicts, pruning, RBAC, wait/status/list/delete, doctor) is in test_launcher_kube_apiserver.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from launcher_k8s_double import Generation, K8sDouble
from launcher_paths import DATA, REPO
from typer.testing import CliRunner

from launcher import runs
from launcher.cli import app

runner = CliRunner()
CONFIG = str(DATA / "sidecar.yaml")
RUN = "sidecar-020304ab"
FAST = ["--poll-interval", "0.01"]
# Pinned images someone published: submit refuses the defaults (placeholders; see test_launcher_cli.py).
IMAGES = ["--set", "cluster.image=registry.example.com/team/userloop-trainer:0.1.0",
          "--set", "cluster.sglang_image=registry.example.com/team/userloop-sglang:v0.5.19-cu129"]  # fmt: skip


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
    return invoke(
        "submit", CONFIG, *IMAGES, "--kubeconfig", str(kubeconfig), "--run-name", RUN, *FAST, *extra
    )


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


def test_dry_run_never_connects(double: K8sDouble, tmp_path: Path) -> None:
    result = invoke("submit", CONFIG, *IMAGES, "--dry-run", "--kubeconfig", str(tmp_path / "missing"))
    assert result.exit_code == 0, result.output
    assert "kind: PyTorchJob" in result.output and "nothing was sent" in result.output
    assert double.requests == []


def test_submit_without_any_cluster_says_what_to_do() -> None:
    result = invoke("submit", CONFIG, *IMAGES)
    assert result.exit_code == 2
    assert "Error: kubeconfig: no cluster configured" in result.output
    assert "Hint:" in result.output and "Traceback" not in result.output


def test_placeholder_images_stop_submit_before_any_cluster_call(double: K8sDouble, kubeconfig: Path) -> None:
    result = invoke("submit", CONFIG, "--kubeconfig", str(kubeconfig), "--run-name", RUN)
    assert result.exit_code == 2, result.output
    assert "cluster.image: ghcr.io/userloop/trainer:0.1.0 is a placeholder" in result.output
    assert double.requests == []


def test_submit_needs_no_local_api_key(
    double: K8sDouble, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    config = str(REPO / "configs" / "intentiongym.yaml")
    result = invoke("submit", config, *IMAGES, "--kubeconfig", str(kubeconfig), "-n", "userloop", *FAST)
    assert result.exit_code == 0, result.output
    assert (
        "info: user_simulator.api_key_env, judge.api_key_env: in the pod DASHSCOPE_API_KEY comes from key "
        "api-key of the Secret dashscope-api-key (namespace userloop;" in result.stderr
    ), result.stderr
    (job,) = double.created("PyTorchJob")
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "DASHSCOPE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "dashscope-api-key",
                                                                        "key": "api-key"}}} in env  # fmt: skip


def test_bad_config_fails_before_any_cluster_call(double: K8sDouble, kubeconfig: Path) -> None:
    result = submit(kubeconfig, "--set", "cluster.rollout_gpus_per_node=8")
    assert result.exit_code == 2
    assert "cluster: rollout_gpus_per_node (8) leaves no GPU" in result.output
    assert double.requests == []


# ----------------------------------------------------------------------------- wait


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


# ----------------------------------------------------------------------------- follow and logs


def test_follow_reconnects_without_repeats_and_across_in_place_restarts(
    double: K8sDouble, kubeconfig: Path
) -> None:
    # restartPolicy OnFailure: the kubelet restarts the container in the same pod (restartCount 1).
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


def test_follow_across_a_pod_the_operator_recreated(double: K8sDouble, kubeconfig: Path) -> None:
    # restartPolicy ExitCode (the chart's default): an OOM-killed trainer's pod is deleted and created
    # again under the same name, with restartCount 0 and without the earlier log.
    double.job_script[RUN] = [cond("Created", "Running")]
    first = Generation(["step 1/3 reward 0.1", "step 2/3 reward 0.2"])
    pod = double.add_pod(RUN, containers={"pytorch": [first]})

    def oom() -> None:
        first.exit_code, first.reason = 137, "OOMKilled"
        again = Generation(["resumed from step_2", "step 3/3 reward 0.3"], exit_code=0)
        new = double.recreate_pod(pod, {"pytorch": [again]})
        new.on_stream_end["pytorch"] = lambda: double.job_script.__setitem__(
            RUN, [cond("Created", "Running", "Succeeded")]
        )

    pod.on_stream_end["pytorch"] = oom
    result = submit(kubeconfig, "--follow")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert [line for line in out if line.startswith(("step", "resumed"))] == [
        "step 1/3 reward 0.1", "step 2/3 reward 0.2", "resumed from step_2", "step 3/3 reward 0.3"]  # fmt: skip
    assert (
        f"--- {RUN}-master-0 was recreated by the operator (a new pod); following its pytorch container"
        in out
    )
    assert not any("restart 0" in line for line in out)


def test_logs_of_a_replica_and_container(double: K8sDouble, kubeconfig: Path) -> None:
    double.add_pod(
        RUN, "worker-0", containers={"pytorch": [Generation(["w"])], "sglang": [Generation(['{"a": 1}'])]}
    )
    args = ["logs", RUN, "-n", "userloop", "--replica", "worker-0", "--kubeconfig", str(kubeconfig)]
    result = invoke(*args, "-c", "sglang")
    assert result.exit_code == 0 and result.output == '{"a": 1}\n'  # a JSON-looking line stays text
    wrong = invoke(*args, "-c", "sglang-typo")
    assert wrong.exit_code == 1
    assert f"400 Bad Request: container sglang-typo is not valid for pod {RUN}-worker-0" in wrong.output
    assert "launcher status NAME" in wrong.output  # the hint: where the pod and container names are


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
