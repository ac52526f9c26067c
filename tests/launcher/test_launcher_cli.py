"""`launcher render` and the cluster section's validation through the CLI: exit codes, messages, imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launcher_paths import DATA, REPO
from typer.testing import CliRunner

from launcher.cli import app

runner = CliRunner()
CONFIG = str(DATA / "sidecar.yaml")


# Each bad setting must fail with its field path, exit 2, no traceback, and before anything renders.
BAD_CLUSTER = [
    (
        "cluster.nodes=3",
        "cluster.pvc.access_mode=ReadWriteOnce",
        "cluster.pvc.access_mode: ReadWriteOnce cannot be mounted",
    ),
    (
        "cluster.gpus_per_node=2",
        "cluster.rollout_gpus_per_node=2",
        "cluster: rollout_gpus_per_node (2) leaves no GPU",
    ),
    (
        "cluster.gpus_per_node=0",
        "cluster.rollout_gpus_per_node=1",
        "cluster: rollout_gpus_per_node is 1 but gpus_per_node is 0",
    ),
    ("cluster.namespace=Team_A", None, "cluster.namespace: 'Team_A' is not a valid Kubernetes namespace"),
    ("cluster.image=ghcr.io/me/trainer", None, "cluster.image: 'ghcr.io/me/trainer' is not pinned"),
    (
        "cluster.sglang_image=lmsysorg/sglang:latest",
        None,
        "cluster.sglang_image: 'lmsysorg/sglang:latest' is not pinned",
    ),
    ("cluster.k8s_version=1.27", None, "cluster.k8s_version: 1.27: native sidecars need Kubernetes 1.29"),
    ("cluster.k8s_version=1.30", None, "cluster.k8s_version: 1.3 is ambiguous"),
    (
        "cluster.resources.trainer.memory=lots",
        None,
        "cluster.resources.trainer.memory: 'lots' is not a Kubernetes quantity",
    ),
    ("cluster.shm_size=16GB", None, "cluster.shm_size: '16GB' is not a Kubernetes quantity"),
    ("cluster.pvc.name=My PVC", None, "cluster.pvc.name: 'My PVC' is not a valid Kubernetes claim name"),
    ("cluster.pvc.mount_path=/dev/shm", None, "cluster.pvc.mount_path: '/dev/shm': use an absolute path"),
    (
        "cluster.api_key_secret.env=MY-KEY",
        None,
        "cluster.api_key_secret.env: 'MY-KEY' is not an environment variable name",
    ),
    ("cluster.labels={team: 'a b'}", None, "cluster.labels: team: 'a b' is not a valid label value"),
    ("cluster.restart_policy=Sometimes", None, "cluster.restart_policy: 'Sometimes'"),
    ("cluster.nodez=2", None, "cluster.nodez: unknown key (did you mean 'nodes'?)"),
    ("name=1st-run", None, "name: '1st-run' must start with a letter"),
    (
        "model.create_if_missing=tiny-qwen3",
        None,
        "cluster.rollout_gpus_per_node: the SGLang sidecar starts before the trainer",
    ),
]


@pytest.mark.parametrize("first,second,message", BAD_CLUSTER, ids=[b[0] for b in BAD_CLUSTER])
def test_bad_cluster_settings_fail_with_the_field_path_before_rendering(
    first: str, second: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import launcher.render

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered a bad config")

    monkeypatch.setattr(launcher.render, "render", no_render)
    args = ["render", CONFIG, "--set", first] + (["--set", second] if second else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def test_render_to_stdout_is_a_yaml_stream() -> None:
    result = runner.invoke(
        app,
        [
            "render",
            CONFIG,
            "--run-name",
            "sidecar-test0001",
            "--k8s-version",
            "1.29",
            "--k8s-version",
            "1.33",
        ],
    )
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ConfigMap", "PyTorchJob"]
    assert "valid for Kubernetes 1.29, 1.33" in result.stderr


def test_render_writes_one_file_per_object(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", CONFIG, "-o", str(tmp_path), "--run-name", "sidecar-test0001"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-serviceaccount-userloop.yaml", "01-configmap-sidecar-test0001-config.yaml",
                     "02-pytorchjob-sidecar-test0001.yaml"]  # fmt: skip


def test_render_creates_the_pvc_only_when_asked() -> None:
    result = runner.invoke(
        app, ["render", CONFIG, "--set", "cluster.pvc.create=true", "--set", "cluster.pvc.storage_class=fast"]
    )
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "fast"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize("bad", ["Sidecar-1", "other-01020304", "sidecar-" + "x" * 60])
def test_a_bad_run_name_is_a_usage_error(bad: str) -> None:
    result = runner.invoke(app, ["render", CONFIG, "--run-name", bad])
    assert result.exit_code == 2 and "Error: --run-name" in result.output


def test_a_user_simulator_key_needs_the_secret() -> None:
    from launcher import checks
    from trainer.config import load_config

    cfg = load_config(DATA / "sidecar.yaml", ["cluster.api_key_secret=null"])
    # Works before and after the config grows a user_simulator section.
    fake = type("Sim", (), {"api_key_env": "DASHSCOPE_API_KEY", "backend": "api"})()
    object.__setattr__(cfg, "user_simulator", fake)
    problems = checks._api_key_problems(cfg)
    assert problems and problems[0].startswith(
        "cluster.api_key_secret: unset, but user_simulator.api_key_env"
    )


def test_render_as_a_subprocess_imports_nothing_heavy(tmp_path: Path) -> None:
    """Only a fresh interpreter catches indirect imports of torch & co, or of the kubernetes client."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from launcher.cli import app\n"
        f"r = CliRunner().invoke(app, ['render', {CONFIG!r}, '-o', {str(tmp_path)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'litellm', 'peft', 'accelerate', 'kubernetes') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "launcher", "render", CONFIG, "--set", "cluster.nodes=0"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert cli.returncode == 2
    assert "Error: " in cli.stderr and "cluster.nodes" in cli.stderr and "Traceback" not in cli.stderr


# ----------------------------------------------------------------------------- placeholder images

# Pinned images someone published (any registry but the defaults' ghcr.io/userloop, which nobody publishes).
IMAGES = ["--set", "cluster.image=registry.example.com/team/userloop-trainer:0.1.0",
          "--set", "cluster.sglang_image=registry.example.com/team/userloop-sglang:v0.5.19-cu129"]  # fmt: skip
PLACEHOLDER_HINT = "build and push the images of docker/ (docker/README.md)"


def test_render_warns_about_the_placeholder_images_and_still_renders() -> None:
    result = runner.invoke(app, ["render", CONFIG, "--run-name", "sidecar-test0001"])
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout) if d][-1] == "PyTorchJob"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: cluster.image: ghcr.io/userloop/trainer:0.1.0 is a placeholder nobody publishes: `launcher "
        f"submit` refuses it; {PLACEHOLDER_HINT}, then set cluster.image",
        "warning: cluster.sglang_image: ghcr.io/userloop/sglang:v0.5.19-cu129 is a placeholder nobody publishes: "
        f"`launcher submit` refuses it; {PLACEHOLDER_HINT}, then set cluster.sglang_image",
    ]
    quiet = runner.invoke(app, ["render", CONFIG, *IMAGES])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_submit_refuses_the_placeholder_images_before_anything_else(dry_run: bool) -> None:
    # No kubeconfig exists (conftest): a submit that got as far as connecting would fail differently.
    args = ["submit", CONFIG, *(["--dry-run"] if dry_run else [])]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""  # no manifests printed
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {CONFIG}: 2 problems"
    assert (
        lines[1]
        == "  - cluster.image: ghcr.io/userloop/trainer:0.1.0 is a placeholder: no such image is published"
    )
    assert lines[2].startswith(
        "  - cluster.sglang_image: ghcr.io/userloop/sglang:v0.5.19-cu129 is a placeholder"
    )
    assert lines[3].startswith(f"Hint: {PLACEHOLDER_HINT}, then set cluster.image and cluster.sglang_image")
    assert "--set cluster.image=ghcr.io/<you>/userloop-trainer:0.1.0" in lines[3]
    # Another tag of the placeholder repository is no better.
    other_tag = runner.invoke(app, [*args, *IMAGES, "--set", "cluster.image=ghcr.io/userloop/trainer:0.2.0"])
    assert other_tag.exit_code == 2 and "cluster.image: ghcr.io/userloop/trainer:0.2.0 is a placeholder" in (
        other_tag.stderr
    )


def test_submit_dry_run_with_published_images_passes() -> None:
    result = runner.invoke(app, ["submit", CONFIG, "--dry-run", *IMAGES])
    assert result.exit_code == 0, result.output
    assert "registry.example.com/team/userloop-trainer:0.1.0" in result.stdout


def test_the_sidecar_image_matters_only_with_a_sidecar() -> None:
    no_sidecar = [
        "--set",
        "cluster.rollout_gpus_per_node=0",
        "--set",
        "rollout.sglang.url=http://sglang:30000",
    ]
    result = runner.invoke(app, ["submit", CONFIG, "--dry-run", *IMAGES[:2], *no_sidecar])
    assert result.exit_code == 0, result.output
    assert "sglang_image" not in result.stderr


# ----------------------------------------------------------------------------- API keys on Kubernetes


def test_render_and_dry_run_need_no_local_key_and_say_where_it_comes_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    config = str(REPO / "configs" / "intentiongym.yaml")
    info = (
        "info: user_simulator.api_key_env, judge.api_key_env: in the pod DASHSCOPE_API_KEY comes from key api-key "
        "of the Secret dashscope-api-key (namespace default; `launcher doctor CONFIG` checks it exists), not from "
        "this machine"
    )
    for args in (["render", config], ["submit", config, "--dry-run", *IMAGES]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert info in result.stderr.splitlines(), result.stderr
