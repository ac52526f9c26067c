"""`cluster.api: trainjob`: the chart's Kubeflow Trainer v2 TrainJob and ClusterTrainingRuntime, offline and
against the real kube-apiserver (v1.20.2 + etcd on loopback, tests/launcher/kube_apiserver.py).

Offline: the objects validate against the Kubernetes schemas and the Trainer CRD copies in launcher/crds/,
the pod is the PyTorchJob's pod (only the trainer container's name and the Job's restart policy differ),
Kueue's label is on both job kinds, restart policies map onto Job and JobSet failure rules, and the checks
catch what Trainer's webhook and torch plugin would refuse or silently mis-handle.

Against the real server, with the two Trainer CRD copies installed: submit (dry runs, the runtime before the
TrainJob, the stored objects equal to what was rendered, the ConfigMap owned by the TrainJob, a pruned field
rolled back), wait/status/list/logs/delete through TrainJob conditions written as Trainer writes them, a
namespaced account without rights on ClusterTrainingRuntimes refused before anything is created, and doctor.
The server runs no Trainer, JobSet or Job controller: the tests play them through the status subresource.
"""

from __future__ import annotations

import copy
import re
import urllib.error
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from kube_apiserver import KubeApiserver, collection
from launcher_operator import running, terminated
from launcher_paths import DATA, FIXED_TIME, REPO, all_configs, check_golden
from typer.testing import CliRunner

from launcher import checks, doctor, runs
from launcher.cli import app
from launcher.cluster import Cluster
from launcher.job_apis import CLUSTER_TRAINING_RUNTIME, COMPLETION_INDEX, PYTORCHJOB, TRAINJOB, api_of_replica
from launcher.pruned import dropped_paths
from launcher.render import Rendered, chart_dir, render
from launcher.values import run_name, to_values
from trainer.config import RunConfig, load_config
from trainer.errors import UserError

runner = CliRunner()
CONFIG = DATA / "sidecar.yaml"
TRAINJOB_SET = ["cluster.api=trainjob"]
IMAGES = ["cluster.image=registry.example.com/team/userloop-trainer:0.1.0",
          "cluster.sglang_image=registry.example.com/team/userloop-sglang:v0.5.19-cu129"]  # fmt: skip
GOLDEN = Path(__file__).resolve().parent / "golden" / "trainjob-sidecar-2-nodes.yaml"
MULTI_NODE = ["cluster.nodes=3", "cluster.pvc.access_mode=ReadWriteMany"]
RETRYABLE = [130, 137, 138, 143]  # the training-operator's IsRetryableExitCode, which ExitCode follows


def _render(path: Path = CONFIG, overrides: list[str] | None = None) -> tuple[RunConfig, Rendered]:
    cfg = load_config(path, overrides)
    return cfg, render(cfg, run_name(cfg, now=FIXED_TIME, token="ab"))


def _runtime(rendered: Rendered) -> dict[str, Any]:
    (runtime,) = rendered.runtimes
    return runtime


def _node_job(rendered: Rendered) -> dict[str, Any]:
    (job,) = _runtime(rendered)["spec"]["template"]["spec"]["replicatedJobs"]
    return job


def _node_pod(rendered: Rendered) -> dict[str, Any]:
    return _node_job(rendered)["template"]["spec"]["template"]


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------- offline: the chart


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("config", all_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_renders_a_valid_trainjob(config: Path, nodes: int) -> None:
    cfg, rendered = _render(config, TRAINJOB_SET + (MULTI_NODE if nodes > 1 else []))
    kinds = [o["kind"] for o in rendered.objects]
    # The runtime before the TrainJob: Trainer's webhook refuses a TrainJob whose runtime is missing.
    assert kinds[-3:] == ["ConfigMap", "ClusterTrainingRuntime", "TrainJob"] and "PyTorchJob" not in kinds
    for version in ("1.29", "1.33"):
        assert checks.schema_problems(rendered.objects, version) == []
    assert checks.crd_problems(rendered.job) == [] and checks.crd_problems(_runtime(rendered)) == []
    assert checks.semantic_problems(rendered, cfg) == []
    assert rendered.job["spec"]["trainer"]["numNodes"] == nodes
    assert _node_job(rendered)["template"]["spec"]["parallelism"] == nodes


@pytest.mark.parametrize(("config", "sidecar"), [(CONFIG, "sglang"), (DATA / "vllm-sidecar.yaml", "vllm")])
def test_should_run_the_same_pod_as_the_pytorchjob_but_in_a_container_named_node(
    config: Path, sidecar: str
) -> None:
    _, pytorchjob = _render(config, MULTI_NODE)
    _, trainjob = _render(config, TRAINJOB_SET + MULTI_NODE)
    master = copy.deepcopy(pytorchjob.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    node = copy.deepcopy(_node_pod(trainjob))
    # The three differences, all deliberate: the container's name, the annotation naming it, and the
    # restart policy a Job's pod must have (the training-operator sets a PyTorchJob pod's itself).
    assert node["spec"].pop("restartPolicy") == "Never"
    assert [c["name"] for c in node["spec"]["containers"]] == ["node"]
    assert node["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "node"
    node["spec"]["containers"][0]["name"] = "pytorch"
    node["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "pytorch"
    for labels in (master["metadata"]["labels"], node["metadata"]["labels"]):
        labels.pop("app.kubernetes.io/instance"), labels.pop("userloop.dev/run")  # the run names differ
    master_env = master["spec"]["containers"][0]["env"]
    node_env = node["spec"]["containers"][0]["env"]
    for env in (master_env, node_env):
        env[:] = [e for e in env if e["name"] != "USERLOOP_RUN_NAME"]
    volumes = {v["name"]: v for v in node["spec"]["volumes"]}
    volumes["config"]["configMap"]["name"] = master["spec"]["volumes"][0]["configMap"]["name"]
    assert node == master
    # The rollout server is the same native sidecar (SGLang's or vLLM's), gating the trainer on its probe.
    (init,) = _node_pod(trainjob)["spec"]["initContainers"]
    assert init["name"] == sidecar and init["restartPolicy"] == "Always" and "startupProbe" in init


def test_torchrun_gets_its_rendezvous_from_the_trainer_torch_plugin() -> None:
    """What Kubeflow Trainer's torch plugin (pkg/runtime/framework/plugins/torch) needs to inject PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK (the completion index), PET_MASTER_ADDR `<trainjob>-node-0-0.<trainjob>`
    and PET_MASTER_PORT into the container `node`, which torchrun then reads as it reads the
    training-operator's PET_* variables: the same command serves both APIs."""
    cfg, rendered = _render(CONFIG, TRAINJOB_SET + MULTI_NODE)
    tj, runtime = rendered.job, _runtime(rendered)
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": runtime["metadata"]["name"]}  # fmt: skip
    assert runtime["metadata"]["name"] == rendered.run and "namespace" not in runtime["metadata"]
    # The plugin injects only when the TrainJob has a trainer section and the runtime an mlPolicy.torch.
    assert tj["spec"]["trainer"] == {"numNodes": 3, "numProcPerNode": cfg.cluster.trainer_gpus}
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {}}
    job = _node_job(rendered)
    assert job["name"] == "node" and job["replicas"] == 1  # PET_MASTER_ADDR names the job `node`
    assert job["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert job["template"]["spec"]["completionMode"] == "Indexed"  # PET_NODE_RANK is the completion index
    (trainer,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert trainer["command"] == ["python", "-m", "trainer.torchrun"]
    assert trainer["args"] == ["-m", "trainer", "--config", "/etc/userloop/config.yaml"]
    # Nothing of ours competes with the plugin's variables (its webhook refuses a TrainJob setting them).
    assert not [e["name"] for e in trainer["env"] if e["name"].startswith("PET_") or "MASTER" in e["name"]]
    # JobSet's hostname of the last pod fits a DNS label.
    assert len(f"{rendered.run}-node-0-2") <= 63


def test_should_label_both_job_kinds_for_kueue_and_only_the_jobs() -> None:
    _, pytorchjob = _render(CONFIG)
    _, trainjob = _render(CONFIG, TRAINJOB_SET)
    for job in (pytorchjob.job, trainjob.job):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue admits the TrainJob; a label on the runtime or the pods would mean nothing to it.
    assert "kueue.x-k8s.io/queue-name" not in _runtime(trainjob)["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in _node_pod(trainjob)["metadata"]["labels"]
    _, unqueued = _render(CONFIG, [*TRAINJOB_SET, "cluster.queue=null"])
    assert "kueue.x-k8s.io/queue-name" not in unqueued.job["metadata"]["labels"]


@pytest.mark.parametrize(
    ("policy", "pod_restart", "backoff", "pod_failure_policy", "failure_policy"),
    [
        # ExitCode: the operator's retryable exits restart the whole gang (a failed Job, backoffLimit 0,
        # which JobSet restarts up to cluster.backoff_limit times); any other exit of the trainer fails the
        # Job as PodFailurePolicy, which fails the JobSet at once.
        ("ExitCode", "Never", 0,
         {"rules": [{"action": "FailJob",
                     "onExitCodes": {"containerName": "node", "operator": "NotIn", "values": RETRYABLE}}]},
         {"maxRestarts": 5, "rules": [{"name": "failOnTrainerError", "action": "FailJobSet",
                                       "onJobFailureReasons": ["PodFailurePolicy"]}]}),
        # OnFailure: the kubelet restarts the container in place; the Job counts the restarts.
        ("OnFailure", "OnFailure", 5, None, None),
        ("Never", "Never", 0, None, None),
    ],
)  # fmt: skip
def test_restart_policy_maps_onto_job_and_jobset_failure_rules(
    policy: str, pod_restart: str, backoff: int, pod_failure_policy: Any, failure_policy: Any
) -> None:
    _, rendered = _render(
        CONFIG, [*TRAINJOB_SET, f"cluster.restart_policy={policy}", "cluster.backoff_limit=5"]
    )
    spec = _node_job(rendered)["template"]["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == pod_restart
    assert spec["backoffLimit"] == backoff
    assert spec.get("podFailurePolicy") == pod_failure_policy
    assert _runtime(rendered)["spec"]["template"]["spec"].get("failurePolicy") == failure_policy


def test_deadline_goes_to_the_trainjob_and_the_ttl_to_the_jobset() -> None:
    _, rendered = _render(CONFIG, [*TRAINJOB_SET, "cluster.ttl_seconds_after_finished=3600"])
    assert rendered.job["spec"]["activeDeadlineSeconds"] == 172800  # the fixture's active_deadline_seconds
    assert _runtime(rendered)["spec"]["template"]["spec"]["ttlSecondsAfterFinished"] == 3600
    _, kept = _render(CONFIG, [*TRAINJOB_SET, "cluster.ttl_seconds_after_finished=null",
                               "cluster.active_deadline_seconds=null"])  # fmt: skip
    assert "ttlSecondsAfterFinished" not in _runtime(kept)["spec"]["template"]["spec"]
    assert "activeDeadlineSeconds" not in kept.job["spec"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.restart_policy=Always", "restart_policy Always cannot be a TrainJob's"),
        ("cluster.gang_scheduling=true", "set cluster.queue instead"),
    ],
)
def test_the_config_refuses_what_a_trainjob_cannot_do(override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(CONFIG, [*TRAINJOB_SET, override])
    load_config(CONFIG, [override])  # a PyTorchJob can


def _mutated(rendered: Rendered, change: Any) -> Rendered:
    bad = copy.deepcopy(rendered)
    change(bad)
    return bad


def test_checks_catch_what_trainer_would_refuse_or_mishandle() -> None:
    cfg, rendered = _render(CONFIG, TRAINJOB_SET)

    def pod(r: Rendered) -> dict[str, Any]:
        return _node_pod(r)["spec"]

    cases = [
        (lambda r: pod(r)["containers"][0].update(name="pytorch"), "exactly one, named `node`"),
        (lambda r: _node_job(r).update(name="trainer"), "exactly one, named `node`"),
        (lambda r: pod(r)["containers"][0]["env"].append({"name": "PET_MASTER_ADDR", "value": "x"}),
         "env PET_MASTER_ADDR: set by Trainer's torch plugin"),
        (lambda r: pod(r).update(restartPolicy="Always"), "a Job takes Never or OnFailure"),
        (lambda r: pod(r).update(restartPolicy="OnFailure"), "Never when it has a podFailurePolicy"),
        (lambda r: _node_job(r)["template"]["metadata"]["labels"].clear(), "trainjob-ancestor-step"),
        (lambda r: r.job["spec"]["runtimeRef"].update(name="torch-distributed"), "must name the run's"),
        (lambda r: r.job["spec"]["trainer"].update(numNodes=2), "must both be cluster.nodes 1"),
        (lambda r: _runtime(r)["spec"]["mlPolicy"].pop("torch"), "no PET_* reach torchrun"),
    ]  # fmt: skip
    for change, message in cases:
        problems = checks.semantic_problems(_mutated(rendered, change), cfg)
        assert any(message in p for p in problems), (message, problems)
    # The CRD copies: an unknown field (the pre-v2.2 podTemplateOverrides) and a string where the CRD
    # wants an integer; a runtime field the CRD does not know.
    bad = copy.deepcopy(rendered.job)
    bad["spec"]["podTemplateOverrides"] = []
    bad["spec"]["trainer"]["numProcPerNode"] = "6"
    problems = checks.crd_problems(bad)
    assert any("'podTemplateOverrides' was unexpected" in p for p in problems), problems
    assert any("numProcPerNode: '6' is not of type 'integer' (TrainJob CRD)" in p for p in problems)
    runtime = copy.deepcopy(_runtime(rendered))
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "bogus"
    ] = 1
    assert any("'bogus' was unexpected" in p for p in checks.crd_problems(runtime))
    # The Kubernetes schemas of the cluster's version reach into the runtime's Job template.
    assert any(
        "replicatedJobs.node.template" in p and "bogus" in p
        for p in checks.schema_problems([runtime], "1.29")
    )


def test_golden_trainjob_manifest() -> None:
    """A reviewed, rendered TrainJob run: regenerate with UPDATE_GOLDEN=1 after a deliberate chart change."""
    _, rendered = _render(CONFIG, [*TRAINJOB_SET, "cluster.nodes=2"])
    check_golden(rendered, GOLDEN)


def test_shipped_trainer_crds_are_the_shared_ones() -> None:
    shared = REPO.parent / "shared" / "crds"
    if not shared.is_dir():
        pytest.skip("no ../shared checkout here")
    for kind in ("TrainJob", "ClusterTrainingRuntime"):
        path = checks.CRD_PATHS[kind]
        assert (shared / path.name).read_bytes() == path.read_bytes(), path.name


def test_helm_lint_and_render_cli_with_the_trainjob_api() -> None:
    cfg = load_config(CONFIG, TRAINJOB_SET)
    result = helm_python.lint(
        str(chart_dir()), to_values(cfg, "lint-01020304"), strict=True, kube_version="v1.33.0"
    )
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] >= 2] == []
    out = invoke("render", str(CONFIG), "--set", "cluster.api=trainjob", "--k8s-version", "1.29")
    assert out.exit_code == 0, out.output
    assert "valid for Kubernetes 1.29 and the ClusterTrainingRuntime and TrainJob CRD" in out.stderr


def test_notes_name_the_trainjob_pods_and_container() -> None:
    _, rendered = _render(CONFIG, TRAINJOB_SET)
    run = rendered.run
    selector = f"jobset.sigs.k8s.io/jobset-name={run},batch.kubernetes.io/job-completion-index=0"
    assert f"kubectl logs -n userloop -f -l {selector} -c node" in rendered.notes
    assert f"kubectl get trainjob -n userloop {run}" in rendered.notes
    assert TRAINJOB.logs_command("userloop", run) == f"kubectl logs -n userloop -f -l {selector} -c node"


# ----------------------------------------------------------------------------- offline: the API description


def _cond(ctype: str, status: str = "True", reason: str = "Reason", message: str = "") -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message or f"{ctype} message",
            "lastTransitionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


def _jobs_status(
    ready: int = 0, active: int = 0, succeeded: int = 0, failed: int = 0
) -> list[dict[str, Any]]:
    return [{"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]  # fmt: skip


@pytest.mark.parametrize(
    ("conditions", "jobs", "state"),
    [
        ([], [], "Pending"),
        ([_cond("Created", reason="JobsCreationSucceeded")], [], "Created"),
        ([_cond("Created")], _jobs_status(active=1), "Created"),  # pods exist, none ready yet
        ([_cond("Created")], _jobs_status(ready=1, active=1), "Running"),
        ([_cond("Suspended", reason="Suspended")], [], "Suspended"),  # queued by Kueue
        ([_cond("Suspended", "False", "Resumed"), _cond("Created")], _jobs_status(ready=1), "Running"),
        ([_cond("Created"), _cond("Complete", reason="AllJobsCompleted")], _jobs_status(succeeded=1), "Succeeded"),
        ([_cond("Complete"), _cond("Created")], [], "Succeeded"),  # final anywhere in the list
        ([_cond("Created"), _cond("Failed", reason="FailedJobs")], _jobs_status(failed=1), "Failed"),
    ],
)  # fmt: skip
def test_trainjob_state(conditions: list[dict[str, Any]], jobs: list[dict[str, Any]], state: str) -> None:
    job = {"kind": "TrainJob", "status": {"conditions": conditions, "jobsStatus": jobs}}
    assert runs.job_state(job) == state
    # A PyTorchJob's Complete is not success: the descriptions do not mix.
    assert PYTORCHJOB.state({"status": {"conditions": [_cond("Complete")]}}) == "Complete"


def test_the_rank_0_pod_of_a_trainjob_is_the_newest_pod_of_completion_index_0() -> None:
    def pod(name: str, index: str, created: str, deleting: bool = False) -> dict[str, Any]:
        meta = {"name": name, "annotations": {COMPLETION_INDEX: index}, "creationTimestamp": created}
        if deleting:
            meta["deletionTimestamp"] = created
        return {"metadata": meta}

    pods = [pod("r-node-0-0-aaaaa", "0", "2025-01-02T03:04:05Z"), pod("r-node-0-1-bbbbb", "1", "2025-01-02T03:04:09Z"),
            pod("r-node-0-0-ccccc", "0", "2025-01-02T03:05:00Z"),
            pod("r-node-0-0-ddddd", "0", "2025-01-02T03:06:00Z", deleting=True)]  # fmt: skip
    assert TRAINJOB.pod_of("r", "node-0", lambda: pods) == "r-node-0-0-ccccc"
    assert TRAINJOB.pod_of("r", "node-1", lambda: pods) == "r-node-0-1-bbbbb"
    assert TRAINJOB.pod_of("r", "node-2", lambda: pods) is None
    # The PyTorchJob's pods have fixed names: no listing needed.
    assert PYTORCHJOB.pod_of("r", "worker-1", lambda: pytest.fail("listed pods")) == "r-worker-1"
    assert api_of_replica("node-3") is TRAINJOB and api_of_replica("master-0") is PYTORCHJOB
    assert api_of_replica("worker-x") is None


class _Crds:
    """doctor's reads of a cluster that serves the CRDs named in ``served`` (the real-server test below
    cannot remove the session's PyTorchJob CRD)."""

    host, namespace = "https://cluster", "userloop"

    def __init__(self, served: dict[str, dict[str, Any]]):
        self.served = served

    def crd(self, name: str, kind: str) -> dict[str, Any] | None:
        return self.served.get(name)

    def job_crd(self) -> dict[str, Any] | None:
        return self.crd(PYTORCHJOB.resource.crd, "PyTorchJob")


def _crd_copy(kind: str) -> dict[str, Any]:
    return yaml.safe_load(checks.CRD_PATHS[kind].read_text())


JOBSET = {"spec": {"versions": [{"name": "v1alpha2", "served": True}]}}


def test_doctor_says_which_job_api_the_cluster_serves_and_what_to_set() -> None:
    pytorch = _Crds({PYTORCHJOB.resource.crd: _crd_copy("PyTorchJob")})
    trainer = _Crds({TRAINJOB.resource.crd: _crd_copy("TrainJob"), CLUSTER_TRAINING_RUNTIME.crd: _crd_copy("ClusterTrainingRuntime"),
                     doctor.JOBSET_CRD: JOBSET})  # fmt: skip
    both = _Crds({**pytorch.served, **trainer.served})
    as_trainjob = load_config(CONFIG, TRAINJOB_SET)
    as_pytorchjob = load_config(CONFIG)

    def lines(cluster: Any, cfg: RunConfig | None) -> list[str]:
        return [c.line() for c in doctor._job_apis(cluster, cfg)]

    assert lines(pytorch, as_pytorchjob) == [
        "✓ PyTorchJob CRD installed and keeps native sidecars (training-operator >= v1.8)"
    ]
    (missing,) = lines(trainer, as_pytorchjob)
    assert missing.startswith(
        "✗ PyTorchJob CRD (kubeflow.org) is not installed -> this cluster serves TrainJob"
    )
    assert "set cluster.api: trainjob; or install the training-operator" in missing
    (missing,) = lines(trainer, None)  # without a config: the default API, and what else would work
    assert "set cluster.api: trainjob" in missing
    assert lines(trainer, as_trainjob) == [
        "✓ TrainJob, ClusterTrainingRuntime and JobSet CRDs installed; the runtime keeps native sidecars"
    ]
    (missing,) = lines(pytorch, as_trainjob)
    assert missing.startswith(
        "✗ TrainJob CRD (trainer.kubeflow.org) is not installed -> this cluster serves PyTorchJob"
    )
    assert "set cluster.api: pytorchjob; or install Kubeflow Trainer v2.3" in missing
    assert lines(both, as_trainjob)[1].startswith("✓ the cluster also serves PyTorchJob")
    # An older Trainer (before v2.2): the TrainJob CRD without spec.activeDeadlineSeconds.
    old = _crd_copy("TrainJob")
    del old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "activeDeadlineSeconds"
    ]
    (too_old,) = lines(_Crds({**trainer.served, TRAINJOB.resource.crd: old}), as_trainjob)
    assert too_old.startswith("✗ TrainJob CRD predates Kubeflow Trainer v2.2"), too_old
    no_jobset = _Crds({k: v for k, v in trainer.served.items() if k != doctor.JOBSET_CRD})
    assert lines(no_jobset, as_trainjob)[0].startswith("✗ JobSet CRD (jobset.x-k8s.io) is not installed")


# ----------------------------------------------------------------------------- the real kube-apiserver

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
MERGE = "application/merge-patch+json"


def _established(server: KubeApiserver, name: str) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        crd = server.request("GET", f"{collection('CustomResourceDefinition')}/{name}")
        if any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (crd.get("status") or {}).get("conditions") or []
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} was not Established in time")


def _without_empty_string_defaults(node: Any) -> Any:
    """The CRD without its ``default: ""`` entries (controller-gen writes one on every LocalObjectReference
    ``name``): v1.20 decodes an empty-string default as null and refuses the CRD ("in body must be of type
    string: null"); Trainer needs Kubernetes >= 1.31 anyway. A list-map key that loses its default becomes
    required instead, as v1.20 insists. A default only adds a field, so the pruning these tests look at is
    unchanged."""
    if isinstance(node, list):
        return [_without_empty_string_defaults(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _without_empty_string_defaults(v) for k, v in node.items() if not (k == "default" and v == "")}
    items = out.get("items")
    if out.get("x-kubernetes-list-type") == "map" and isinstance(items, dict):
        lost = [
            k
            for k in out.get("x-kubernetes-list-map-keys", [])
            if (node["items"].get("properties") or {}).get(k, {}).get("default") == ""
        ]
        items["required"] = sorted({*items.get("required", []), *lost})
    return out


@pytest.fixture(scope="module")
def trainer_ns(kube_api: KubeApiserver) -> str:
    """Our copies of Kubeflow Trainer's two CRDs installed (as `kubectl create`, which v1.20 takes: it drops
    the CEL rules it does not know), and a namespace of this module's own. Both stay on the session's
    server, which is thrown away at its end; other tests list only in their own namespaces."""
    for kind in ("TrainJob", "ClusterTrainingRuntime"):
        crd = _without_empty_string_defaults(_crd_copy(kind))
        try:
            kube_api.request("POST", collection("CustomResourceDefinition"), crd)
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        _established(kube_api, crd["metadata"]["name"])
    ns = f"tj-{uuid.uuid4().hex[:6]}"
    kube_api.request(
        "POST", collection("Namespace"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    return ns


@pytest.fixture
def tj_kubeconfig(kube_api: KubeApiserver, trainer_ns: str, tmp_path: Path) -> Path:
    return kube_api.kubeconfig(tmp_path / "kubeconfig", namespace=trainer_ns)


def new_run() -> str:
    return f"sidecar-{uuid.uuid4().hex[:8]}"


def submit(kubeconfig: Path, ns: str, run: str, *extra: str) -> Any:
    sets = [arg for item in [*IMAGES, *TRAINJOB_SET] for arg in ("--set", item)]
    return invoke("submit", str(CONFIG), *sets, "-n", ns, "--kubeconfig", str(kubeconfig), "--run-name", run,
                  "--poll-interval", "0.02", *extra)  # fmt: skip


class Trainer:
    """Plays Kubeflow Trainer, JobSet and the Job controller for one TrainJob on a server that runs none:
    TrainJob conditions and jobsStatus as Trainer writes them (pkg/runtime/framework/plugins/jobset: the
    JobSet's Completed and Failed conditions copied as Complete and Failed), and the pods JobSet's Indexed
    Job creates from the runtime's template: `<trainjob>-node-0-<index>-<random>`, JobSet's labels, the
    completion-index annotation and the PET_* the torch plugin injects into the container `node`."""

    def __init__(self, server: KubeApiserver, ns: str, run: str):
        self.server, self.ns, self.run = server, ns, run
        self.path = f"{TRAINER}/namespaces/{ns}/trainjobs/{run}"

    def status(self, conditions: list[dict[str, Any]], jobs: list[dict[str, Any]] | None = None) -> None:
        status: dict[str, Any] = {"conditions": conditions}
        if jobs is not None:
            status["jobsStatus"] = jobs
        self.server.request("PATCH", f"{self.path}/status", {"status": status}, content_type=MERGE)

    def create_pod(self, index: int = 0) -> str:
        runtime = self.server.request("GET", f"{TRAINER}/clustertrainingruntimes/{self.run}")
        (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        template = copy.deepcopy(rjob["template"]["spec"]["template"])
        spec = template["spec"]
        for init in spec.get("initContainers") or []:
            # This v1.20 server predates native sidecars (1.28): it refuses probes on init containers.
            for key in ("startupProbe", "readinessProbe", "livenessProbe", "restartPolicy"):
                init.pop(key, None)
        node = next(c for c in spec["containers"] if c["name"] == "node")
        node["env"] = [*node.get("env", []),
                       {"name": "PET_NNODES", "value": "1"}, {"name": "PET_NPROC_PER_NODE", "value": "6"},
                       {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
                       {"name": "PET_MASTER_ADDR", "value": f"{self.run}-node-0-0.{self.run}"},
                       {"name": "PET_MASTER_PORT", "value": "29500"}]  # fmt: skip
        spec["hostname"], spec["subdomain"] = f"{self.run}-node-0-{index}", self.run
        name = f"{self.run}-node-0-{index}-{uuid.uuid4().hex[:5]}"
        labels = {**template["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": self.run,
                  "jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
                  "batch.kubernetes.io/job-completion-index": str(index), "job-name": f"{self.run}-node-0"}  # fmt: skip
        annotations = {**template["metadata"].get("annotations", {}), COMPLETION_INDEX: str(index)}
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": spec,
               "metadata": {"name": name, "namespace": self.ns, "labels": labels, "annotations": annotations}}  # fmt: skip
        self.server.request("POST", collection("Pod", self.ns), pod)
        return name

    def pod_status(self, pod: str, phase: str, containers: list[dict[str, Any]]) -> None:
        path = f"{collection('Pod', self.ns)}/{pod}/status"
        self.server.request("PATCH", path, {"status": {"phase": phase, "containerStatuses": containers}},
                            content_type=MERGE)  # fmt: skip


def test_submit_creates_the_runtime_then_the_trainjob_exactly_as_rendered(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    run = new_run()
    result = submit(tj_kubeconfig, trainer_ns, run)
    assert result.exit_code == 0, result.output
    assert f"submitted {run} (namespace {trainer_ns})" in result.output
    assert TRAINJOB.logs_command(trainer_ns, run) in result.output  # the NOTES and the next command
    rendered = render(load_config(CONFIG, [*IMAGES, *TRAINJOB_SET, f"cluster.namespace={trainer_ns}"]), run)
    stored_job = kube_api.request("GET", f"{TRAINER}/namespaces/{trainer_ns}/trainjobs/{run}")
    stored_runtime = kube_api.request("GET", f"{TRAINER}/clustertrainingruntimes/{run}")
    # v1.20 prunes what a CRD does not know: nothing of the chart's objects was dropped, the runtime's
    # native sidecar (initContainers[].restartPolicy) and the Job's podFailurePolicy included.
    assert dropped_paths(rendered.job, stored_job) == []
    assert dropped_paths(_runtime(rendered), stored_runtime) == []
    (sidecar,) = stored_runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"]["initContainers"]  # fmt: skip
    assert sidecar["restartPolicy"] == "Always"
    assert stored_runtime["metadata"]["labels"]["userloop.dev/namespace"] == trainer_ns
    cm = kube_api.request("GET", f"/api/v1/namespaces/{trainer_ns}/configmaps/{run}-config")
    assert cm["metadata"]["ownerReferences"] == [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                                                  "name": run, "uid": stored_job["metadata"]["uid"]}]  # fmt: skip
    assert invoke("delete", run, "-n", trainer_ns, "--kubeconfig", str(tj_kubeconfig)).exit_code == 0


def test_a_pruned_trainjob_field_stops_submit_and_removes_what_the_run_created(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    run = new_run()
    cfg = load_config(CONFIG, [*IMAGES, *TRAINJOB_SET, f"cluster.namespace={trainer_ns}"])
    rendered = render(cfg, run)
    rendered.job["spec"]["trainer"]["fromTheFuture"] = True  # as a field newer than the cluster's CRD
    cluster = Cluster(kubeconfig=str(tj_kubeconfig))
    with pytest.raises(UserError) as err:
        runs.submit(cluster, rendered, say=lambda _: None)
    message = err.value.render()
    assert message.startswith(
        f"TrainJob/{run}: the API server would silently drop 1 field(s) it does not know"
    )
    # The TrainJob's dry run needs its runtime to exist (Trainer's webhook): the two created before it go again.
    assert "(the run's ConfigMap and ClusterTrainingRuntime just created were deleted again)" in message
    assert "spec.trainer.fromTheFuture" in message
    assert cluster.get("ConfigMap", f"{run}-config") is None
    assert cluster.get("ClusterTrainingRuntime", run) is None and cluster.get_job(run) is None


def test_wait_status_list_logs_and_delete_follow_trainjob_conditions(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    run = new_run()
    assert submit(tj_kubeconfig, trainer_ns, run).exit_code == 0
    cluster = Cluster(kubeconfig=str(tj_kubeconfig))
    trainer = Trainer(kube_api, trainer_ns, run)
    created = _cond("Created", reason="JobsCreationSucceeded", message="Succeeded to create Jobs")
    seen: dict[str, Any] = {}

    def running_pod() -> None:
        seen["pod"] = pod = trainer.create_pod()
        trainer.pod_status(pod, "Running", [running("node")])
        trainer.status([created], _jobs_status(ready=1, active=1))
        seen["status"] = runs.status(cluster, run)

    steps = iter([
        lambda: trainer.status([created], _jobs_status()),
        running_pod,
        lambda: (trainer.pod_status(seen["pod"], "Succeeded", [terminated("node", 0, "Completed")]),
                 trainer.status([created, _cond("Complete", reason="AllJobsCompleted", message="jobset completed successfully")],
                                _jobs_status(succeeded=1))),
    ])  # fmt: skip
    out: list[str] = []
    # No API given: the first poll finds which one the run is.
    code = runs.wait(cluster, run, timeout=60, say=out.append, sleep=lambda _: next(steps)())
    assert code == 0, out
    assert out == [f"{run}: {s}" for s in ("Pending", "Created", "Running", "Succeeded")]
    status = seen["status"]
    assert status["kind"] == "TrainJob" and status["state"] == "Running"
    assert [p["name"] for p in status["pods"]] == [seen["pod"]] and status["pods"][0]["containers"] == {
        "node": "running"
    }
    assert status["replicas"] == {
        "node": {"active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}
    }
    kc = ["-n", trainer_ns, "--kubeconfig", str(tj_kubeconfig)]
    listed = invoke("list", *kc, "--output", "json")
    assert listed.exit_code == 0, listed.output
    row = next(r for r in yaml.safe_load(listed.output) if r["name"] == run)
    assert row | {"created": None} == {
        "name": run,
        "config": "sidecar",
        "state": "Succeeded",
        "nodes": 1,
        "created": None,
    }
    # The rank-0 pod is found by JobSet's label and the completion index; there is no kubelet, so its log is empty.
    logs = invoke("logs", run, *kc)
    assert logs.exit_code == 0 and logs.output == "", logs.output
    # A PyTorchJob's replica name is that API's pod name, which a TrainJob's pods never have.
    wrong = invoke("logs", run, *kc, "--replica", "master-0")
    assert wrong.exit_code == 1 and f"{run}-master-0" in wrong.output and "not found" in wrong.output, (
        wrong.output
    )
    deleted = invoke("delete", run, *kc)
    assert deleted.exit_code == 0 and f"deleted {run}" in deleted.output
    assert cluster.get_job(run) is None and cluster.get("ConfigMap", f"{run}-config") is None
    assert cluster.get("ClusterTrainingRuntime", run) is None  # nothing namespaced could own it: delete did
    assert invoke("delete", run, *kc).exit_code == 1


def test_wait_exits_1_on_a_failed_trainjob_with_the_node_containers_exit(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    run = new_run()
    result = submit(tj_kubeconfig, trainer_ns, run)
    assert result.exit_code == 0, result.output
    cluster = Cluster(kubeconfig=str(tj_kubeconfig))
    trainer = Trainer(kube_api, trainer_ns, run)
    created = _cond("Created", reason="JobsCreationSucceeded")
    pod: dict[str, str] = {}

    def fail() -> None:
        pod["name"] = trainer.create_pod()
        trainer.pod_status(pod["name"], "Failed", [terminated("node", 2, "Error", "ValueError: boom\n")])
        trainer.status([created, _cond("Failed", reason="FailedJobs", message="jobset failed: trainer exited 2")],
                       _jobs_status(failed=1))  # fmt: skip

    steps = iter([lambda: trainer.status([created], _jobs_status()), fail])
    out: list[str] = []
    code = runs.wait(cluster, run, timeout=60, say=out.append, sleep=lambda _: next(steps)(), api=TRAINJOB)
    assert code == 1, out
    assert f"{run}: jobset failed: trainer exited 2" in out
    assert f"{pod['name']}/node: exited 2 (Error): ValueError: boom" in out
    runs.delete(cluster, run)


def test_an_account_without_rights_on_cluster_runtimes_is_refused_before_anything_is_created(
    kube_api: KubeApiserver, trainer_ns: str, tmp_path: Path
) -> None:
    """The runtime is cluster-scoped: a namespaced Role cannot grant it. The dry run says so (exit 1, the
    server names the verb and resource) and nothing of the run exists; a ClusterRole for
    clustertrainingruntimes is what an admin adds (docs/launcher.md)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    name = f"submitter-{uuid.uuid4().hex[:4]}"
    kube_api.request("POST", collection("ServiceAccount", trainer_ns),
                     {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})  # fmt: skip
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
            "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "list", "delete"]},
                      {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete", "patch"]},
                      {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "create"]}]}  # fmt: skip
    kube_api.request("POST", f"{rbac}/namespaces/{trainer_ns}/roles", role)
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": trainer_ns}]
    kube_api.request("POST", f"{rbac}/namespaces/{trainer_ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}, "subjects": subject})  # fmt: skip
    token = kube_api.service_account_token(trainer_ns, name)
    kubeconfig = kube_api.kubeconfig(tmp_path / "sa-kubeconfig", token=token, namespace=trainer_ns)
    run = new_run()
    refused = submit(kubeconfig, trainer_ns, run)
    assert refused.exit_code == 1, refused.output
    assert f"Error: dry-run create ClusterTrainingRuntime/{run}: 403 Forbidden" in refused.output
    assert (
        'cannot create resource "clustertrainingruntimes" in API group "trainer.kubeflow.org" at the cluster scope'
        in refused.output
    )
    assert (
        "Hint: a ClusterTrainingRuntime is cluster-scoped, which no namespaced Role can grant"
        in refused.output
    )
    with pytest.raises(urllib.error.HTTPError):
        kube_api.request("GET", f"/api/v1/namespaces/{trainer_ns}/configmaps/{run}-config")
    # What an admin grants for TrainJob submissions: create, get and delete of the cluster-scoped runtime.
    cluster_role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
                    "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                               "verbs": ["create", "get", "delete"]}]}  # fmt: skip
    kube_api.request("POST", f"{rbac}/clusterroles", cluster_role)
    kube_api.request("POST", f"{rbac}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}, "subjects": subject})  # fmt: skip
    try:
        allowed = submit(kubeconfig, trainer_ns, run)
        assert allowed.exit_code == 0, allowed.output
        deleted = invoke("delete", run, "-n", trainer_ns, "--kubeconfig", str(kubeconfig))
        assert deleted.exit_code == 0, deleted.output
        with pytest.raises(urllib.error.HTTPError):
            kube_api.request("GET", f"{TRAINER}/clustertrainingruntimes/{run}")
    finally:
        kube_api.request("DELETE", f"{rbac}/clusterrolebindings/{name}")
        kube_api.request("DELETE", f"{rbac}/clusterroles/{name}")


def test_doctor_on_the_real_server_reports_both_apis(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    args = [
        "doctor",
        str(CONFIG),
        "--set",
        "cluster.api=trainjob",
        "-n",
        trainer_ns,
        "--kubeconfig",
        str(tj_kubeconfig),
    ]
    jobset = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
              "metadata": {"name": doctor.JOBSET_CRD},
              # A stand-in: doctor only asks whether JobSet is installed (no JobSet CRD copy ships here).
              "spec": {"group": "jobset.x-k8s.io", "scope": "Namespaced",
                       "names": {"kind": "JobSet", "plural": "jobsets", "singular": "jobset", "listKind": "JobSetList"},
                       "versions": [{"name": "v1alpha2", "served": True, "storage": True,
                                     "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}  # fmt: skip
    out = invoke(*args).output.splitlines()
    if not any(line.startswith("✓ TrainJob") for line in out):
        assert out[1].startswith(
            "✗ JobSet CRD (jobset.x-k8s.io) is not installed -> this cluster serves PyTorchJob"
        ), out
        kube_api.request("POST", collection("CustomResourceDefinition"), jobset)
        _established(kube_api, doctor.JOBSET_CRD)
        out = invoke(*args).output.splitlines()
    assert (
        out[1]
        == "✓ TrainJob, ClusterTrainingRuntime and JobSet CRDs installed; the runtime keeps native sidecars"
    )
    assert out[2].startswith("✓ the cluster also serves PyTorchJob"), out
    # The default API's check is unchanged, and now names the alternative.
    default = invoke("doctor", "-n", trainer_ns, "--kubeconfig", str(tj_kubeconfig)).output.splitlines()
    assert default[1] == "✓ PyTorchJob CRD installed and keeps native sidecars (training-operator >= v1.8)"
    assert default[2].startswith("✓ the cluster also serves TrainJob"), default


def test_a_runtime_name_taken_in_another_namespace_is_a_taken_run_name(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    # Runtimes are cluster-wide: another namespace's run of the same name owns the runtime `<run>`.
    run = new_run()
    rendered = render(load_config(CONFIG, [*IMAGES, *TRAINJOB_SET, "cluster.namespace=elsewhere"]), run)
    kube_api.request("POST", f"{TRAINER}/clustertrainingruntimes", _runtime(rendered))
    try:
        result = submit(tj_kubeconfig, trainer_ns, run)
        assert result.exit_code == 2, result.output
        assert f"ClusterTrainingRuntime/{run}: exists already: the run name {run} is taken" in result.output
        with pytest.raises(urllib.error.HTTPError):
            kube_api.request("GET", f"/api/v1/namespaces/{trainer_ns}/configmaps/{run}-config")
        # delete in this namespace leaves the other namespace's runtime alone.
        assert invoke("delete", run, "-n", trainer_ns, "--kubeconfig", str(tj_kubeconfig)).exit_code == 1
        assert kube_api.request("GET", f"{TRAINER}/clustertrainingruntimes/{run}")["metadata"]["name"] == run
    finally:
        kube_api.request("DELETE", f"{TRAINER}/clustertrainingruntimes/{run}")


def test_the_timeout_report_reads_the_child_jobs_refusals(
    kube_api: KubeApiserver, trainer_ns: str, tj_kubeconfig: Path
) -> None:
    """A TrainJob's pods are created by the Job controller, which records a refusal on the child Job
    `<run>-node-0` (reason FailedCreate), not on the TrainJob."""
    run = new_run()
    assert submit(tj_kubeconfig, trainer_ns, run).exit_code == 0
    message = (
        f'Error creating: pods "{run}-node-0-0-abcde" is forbidden: no PriorityClass with name high was found'
    )
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{run}-node-0.{uuid.uuid4().hex[:8]}"},
             "involvedObject": {"kind": "Job", "name": f"{run}-node-0", "namespace": trainer_ns, "apiVersion": "batch/v1"},
             "reason": "FailedCreate", "message": message, "type": "Warning", "count": 1,
             "source": {"component": "job-controller"}}  # fmt: skip
    kube_api.request("POST", f"/api/v1/namespaces/{trainer_ns}/events", event)
    cluster = Cluster(kubeconfig=str(tj_kubeconfig))
    Trainer(kube_api, trainer_ns, run).status(
        [_cond("Created", reason="JobsCreationSucceeded")], _jobs_status()
    )
    out: list[str] = []
    code = runs.wait(cluster, run, timeout=0, say=out.append, sleep=lambda _: None, api=TRAINJOB)
    assert code == runs.EXIT_TIMEOUT, out
    assert (
        f"{run}: the operator cannot create its pods: {message} -> fix cluster.priority_class" in out[-1]
    ), out
    runs.delete(cluster, run)
