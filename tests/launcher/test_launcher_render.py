"""The chart rendered from every config: valid for Kubernetes 1.29 and 1.33 and the PyTorchJob CRD, and
right in the ways a cluster would otherwise teach the hard way."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from launcher_paths import DATA, FIXED_TIME, REPO, all_configs, check_golden

from launcher import checks
from launcher.render import Rendered, chart_dir, render
from launcher.values import run_name, to_values
from trainer.config import RunConfig, load_config

GOLDEN = Path(__file__).resolve().parent / "golden" / "sidecar-2-nodes.yaml"
MULTI_NODE = ["cluster.nodes=3", "cluster.pvc.access_mode=ReadWriteMany"]


def _render(path: Path, overrides: list[str] | None = None) -> tuple[RunConfig, Rendered]:
    cfg = load_config(path, overrides)
    return cfg, render(cfg, run_name(cfg, now=FIXED_TIME, token="ab"))


def _pods(rendered: Rendered) -> dict[str, dict[str, Any]]:
    specs = rendered.job["spec"]["pytorchReplicaSpecs"]
    return {rtype: spec["template"]["spec"] for rtype, spec in specs.items()}


def _gpus(container: dict[str, Any]) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_configs_are_found_recursively() -> None:
    names = {p.name for p in all_configs()}
    assert "quickstart.yaml" in names and "sidecar.yaml" in names


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("config", all_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_renders_valid_manifests(config: Path, nodes: int) -> None:
    cfg, rendered = _render(config, MULTI_NODE if nodes > 1 else [])
    assert [o["kind"] for o in rendered.objects][-2:] == ["ConfigMap", "PyTorchJob"]
    for version in ("1.29", "1.33"):
        assert checks.schema_problems(rendered.objects, version) == []
    assert checks.crd_problems(rendered.job) == []
    assert checks.semantic_problems(rendered, cfg) == []
    specs = rendered.job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs.get("Worker", {}).get("replicas", 0) == nodes - 1


def test_shipped_crd_is_the_shared_one() -> None:
    shared = REPO.parent / "shared" / "crds" / "kubeflow.org_pytorchjobs.yaml"
    if not shared.is_file():
        pytest.skip("no ../shared checkout here")
    assert shared.read_bytes() == checks.CRD_PATH.read_bytes()


def test_the_wheel_ships_every_file_of_the_chart() -> None:
    """pyproject's package data lists the chart's files by pattern (setuptools' glob: ``*`` stops at ``/``):
    a new template, sub-folder or dotfile must not be left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "launcher"
    ]
    package = REPO / "launcher"
    shipped = {p.resolve() for pat in patterns for p in package.glob(pat) if p.is_file()}
    chart = REPO / "helm" / "userloop"
    files = {p.resolve() for p in chart.rglob("*") if p.is_file()}
    assert chart / "Chart.yaml" in files and chart / "templates" / "pytorchjob.yaml" in files
    missing = sorted(str(p.relative_to(chart)) for p in files - shipped)
    assert not missing, f"add these to [tool.setuptools.package-data] launcher: {missing}"
    assert (package / "chart").resolve() == chart.resolve()  # the checkout's link


def test_an_installed_launcher_renders_without_the_checkout(tmp_path: Path) -> None:
    """Like a wheel install: the launcher package with a real copy of the chart, run from another directory."""
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site"
    shutil.copytree(REPO / "launcher", site / "launcher", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(REPO / "trainer" / "config", site / "trainer" / "config",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("__init__.py", "errors.py"):
        shutil.copy(REPO / "trainer" / name, site / "trainer" / name)
    assert not (site / "launcher" / "chart").is_symlink()
    env = {k: v for k, v in os.environ.items() if k not in ("USERLOOP_CHART", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", "import sys; from launcher.cli import main; sys.exit(main())", "render",
                          str(DATA / "sidecar.yaml"), "-o", str(tmp_path / "out")],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert any((tmp_path / "out").iterdir())


def test_should_run_the_trainer_as_container_pytorch_with_torchrun() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    for spec in _pods(rendered).values():
        (trainer,) = spec["containers"]
        assert trainer["name"] == "pytorch"
        assert trainer["command"] == ["python", "-m", "trainer.torchrun"]
        assert trainer["args"] == ["-m", "trainer", "--config", "/etc/userloop/config.yaml"]
        env = {e["name"]: e for e in trainer["env"]}
        assert env["LITELLM_LOCAL_MODEL_COST_MAP"]["value"] == "True"
        assert env["USERLOOP_SGLANG_URL"]["value"] == "http://127.0.0.1:30000"
        # torchrun must not SIGKILL the workers before their SIGTERM checkpoint is written.
        grace = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
        assert grace == cfg.cluster.termination_grace_period_seconds > cfg.checkpoint.grace_s
    assert rendered.job["spec"]["nprocPerNode"] == "6"


def test_should_run_sglang_as_a_native_sidecar_with_a_startup_probe() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml", MULTI_NODE)
    for spec in _pods(rendered).values():
        (sidecar,) = spec["initContainers"]
        assert sidecar["name"] == "sglang"
        assert sidecar["restartPolicy"] == "Always"
        probe = sidecar["startupProbe"]
        assert probe["httpGet"]["path"] == "/health_generate"
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
        # Never /health: SGLang's runs a generation, which waits behind a weight reload (test_sglang_contract.py).
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/model_info"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/model_info"
        args = sidecar["args"]
        assert args[args.index("--tp-size") + 1] == "2"
        assert args[args.index("--model-path") + 1] == "Qwen/Qwen3-0.6B"
        # LoRA is on in the fixture: the server must be able to load adapters of that rank and modules.
        assert "--enable-lora" in args
        assert args[args.index("--max-lora-rank") + 1] == "32"
        i = args.index("--lora-target-modules")
        assert args[i + 1 : i + 3] == ["q_proj", "v_proj"]
        # SGLang refuses max_loaded_loras below max_loras_per_batch (default 8): both are given.
        assert args[args.index("--max-loaded-loras") + 1] == "2"
        assert args[args.index("--max-loras-per-batch") + 1] == "2"


def test_should_pass_no_lora_flags_when_lora_is_off() -> None:
    _, rendered = _render(DATA / "sidecar.yaml", ["model.lora.enabled=false"])
    for spec in _pods(rendered).values():
        assert not any(
            a.startswith("--lora") or a == "--enable-lora" for a in spec["initContainers"][0]["args"]
        )


def test_should_render_no_sidecar_when_rollout_gpus_is_0() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml", ["cluster.rollout_gpus_per_node=0"])
    spec = _pods(rendered)["Master"]
    assert "initContainers" not in spec
    assert _gpus(spec["containers"][0]) == 8
    assert rendered.job["spec"]["nprocPerNode"] == "8"


@pytest.mark.parametrize("gpus,rollout", [(8, 2), (4, 1), (2, 1), (1, 0), (0, 0)])
def test_gpu_limits_add_up(gpus: int, rollout: int) -> None:
    _, rendered = _render(
        DATA / "sidecar.yaml", [f"cluster.gpus_per_node={gpus}", f"cluster.rollout_gpus_per_node={rollout}"]
    )
    for spec in _pods(rendered).values():
        trainer = _gpus(spec["containers"][0])
        sidecar = sum(_gpus(c) for c in spec.get("initContainers", []))
        assert (trainer, sidecar) == (gpus - rollout, rollout)
        tolerations = spec.get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations) == (gpus > 0)
        assert trainer == 0 or rendered.job["spec"]["nprocPerNode"] == str(trainer)


def test_should_mount_dev_shm_and_the_pvc_in_both_containers() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    spec = _pods(rendered)["Master"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/weights"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/mnt/userloop"]]["persistentVolumeClaim"]["claimName"] == "userloop-runs"


def test_should_point_the_trainer_at_the_sidecar_and_the_shared_weights_volume() -> None:
    _, rendered = _render(DATA / "sidecar.yaml")
    spec = _pods(rendered)["Master"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["USERLOOP_SGLANG_URL"] == "http://127.0.0.1:30000"
    assert env["USERLOOP_WEIGHTS_DIR"] == "/weights"  # where rollout.sglang.weights_dir defaults to


def test_checks_catch_a_broken_weight_hand_over_and_an_sglang_run_without_a_server() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    bad = copy.deepcopy(rendered)
    spec = bad.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    sidecar = spec["initContainers"][0]
    sidecar["volumeMounts"] = [m for m in sidecar["volumeMounts"] if m["mountPath"] != "/weights"]
    problems = checks.semantic_problems(bad, cfg)
    assert any("must mount the same volume at /weights" in p for p in problems), problems
    cfg, rendered = _render(DATA / "sidecar.yaml", ["cluster.rollout_gpus_per_node=0"])
    assert any("the pod runs no SGLang server" in p for p in checks.semantic_problems(rendered, cfg))
    cfg, rendered = _render(DATA / "sidecar.yaml", ["cluster.rollout_gpus_per_node=0",
                                                    "rollout.sglang.url=http://sglang.serving:30000"])  # fmt: skip
    assert checks.semantic_problems(rendered, cfg) == []


def test_should_point_output_dir_at_the_pvc_in_the_configmap() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    (cm,) = rendered.by_kind("ConfigMap")
    pod_cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert pod_cfg["output_dir"] == f"/mnt/userloop/runs/{rendered.run}"
    # The trainer must accept what it is given.
    assert RunConfig.model_validate(pod_cfg).name == cfg.name


def test_should_carry_scheduling_labels_annotations_and_security() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    job = rendered.job
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["team"] == "agents"
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 172800
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 604800
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    ann = template["metadata"]["annotations"]
    assert ann["kubectl.kubernetes.io/default-container"] == "pytorch"
    assert ann["sidecar.istio.io/inject"] == "false"
    assert ann["userloop.dev/owner"] == "tests"
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["priorityClassName"] == "high"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_should_keep_user_labels_from_overriding_selector_labels() -> None:
    _, rendered = _render(
        DATA / "sidecar.yaml", ["cluster.labels={app.kubernetes.io/instance: hijack, team: x}"]
    )
    labels = rendered.job["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == rendered.run
    assert labels["team"] == "x"


def test_should_fill_gang_scheduling_with_sidecar_gpus_counted() -> None:
    _, rendered = _render(DATA / "sidecar.yaml", [*MULTI_NODE, "cluster.gang_scheduling=true"])
    policy = rendered.job["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy["minAvailable"] == 3
    assert policy["minResources"] == {"cpu": "36", "memory": "288Gi", "nvidia.com/gpu": "24"}


def test_should_never_put_the_api_key_value_in_any_output(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = "sk-MARKER-0123456789abcdef"
    monkeypatch.setenv("USERLOOP_API_KEY", marker)
    monkeypatch.setenv("DASHSCOPE_API_KEY", marker)
    cfg, rendered = _render(DATA / "sidecar.yaml", MULTI_NODE)
    text = rendered.to_yaml() + rendered.notes + repr(rendered.values)
    assert marker not in text
    ref = {e["name"]: e for e in _pods(rendered)["Master"]["containers"][0]["env"]}["USERLOOP_API_KEY"]
    assert ref == {
        "name": "USERLOOP_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "userloop-api-key", "key": "api-key"}},
    }
    assert checks.secret_problems(text, cfg) == []


def test_should_refuse_a_config_that_pulls_a_key_into_the_configmap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = "sk-MARKER-0123456789abcdef"
    monkeypatch.setenv("USERLOOP_API_KEY", marker)
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(
        (DATA / "sidecar.yaml").read_text() + "\n" + "logging: {wandb: {project: '${USERLOOP_API_KEY}'}}\n"
    )
    cfg, rendered = _render(leaky)
    problems = checks.secret_problems(rendered.to_yaml(), cfg)
    assert problems and "$USERLOOP_API_KEY" in problems[0] and marker not in problems[0]
    with pytest.raises(Exception) as err:
        checks.check(rendered, cfg)
    assert marker not in str(err.value)


@pytest.mark.parametrize("length", [30, 40])
def test_name_length_limits_hold_for_long_config_names(length: int) -> None:
    name = "a" + "b" * (length - 1)
    cfg, rendered = _render(DATA / "sidecar.yaml", [f"name={name}", *MULTI_NODE])
    assert len(rendered.run) <= 63 - len("-worker-1")
    pod_names = [f"{rendered.run}-master-0"] + [f"{rendered.run}-worker-{i}" for i in range(2)]
    assert all(len(n) <= 63 for n in pod_names)
    assert len(f"{rendered.run}-config") <= 253
    assert checks.semantic_problems(rendered, cfg) == []


def test_chart_refuses_a_run_name_too_long_for_pod_names() -> None:
    cfg = load_config(DATA / "sidecar.yaml", MULTI_NODE)
    with pytest.raises(Exception, match="shorten `name`"):
        render(cfg, "x" * 60)


def test_chart_values_schema_rejects_unknown_keys() -> None:
    cfg = load_config(DATA / "sidecar.yaml")
    values = to_values(cfg, "sidecar-01020304") | {"replicaCount": 2}
    with pytest.raises(Exception, match="replicaCount"):
        render(cfg, "sidecar-01020304", values=values)


def test_run_names_are_unique_and_fit() -> None:
    cfg = load_config(DATA / "sidecar.yaml")
    names = {run_name(cfg) for _ in range(20)}
    assert len(names) > 1
    assert all(len(n) == len(cfg.name) + 9 for n in names)


@pytest.mark.parametrize(
    "config", [DATA / "sidecar.yaml", REPO / "configs" / "quickstart.yaml"], ids=["sidecar", "quickstart"]
)
def test_helm_lint_is_clean(config: Path) -> None:
    cfg = load_config(config)
    for values in (None, to_values(cfg, "lint-01020304")):
        for kube in ("v1.29.0", "v1.33.0"):
            result = helm_python.lint(str(chart_dir()), values, strict=True, kube_version=kube)
            assert result["errors"] == []
            assert [m for m in result["messages"] if m["severity"] >= 2] == []


def test_golden_manifest() -> None:
    """A reviewed, rendered manifest: regenerate with UPDATE_GOLDEN=1 after a deliberate chart change."""
    _, rendered = _render(DATA / "sidecar.yaml", ["cluster.nodes=2"])
    check_golden(rendered, GOLDEN)


def test_checks_catch_what_the_cluster_would() -> None:
    cfg, rendered = _render(DATA / "sidecar.yaml")
    bad = copy.deepcopy(rendered)
    spec = bad.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    spec["containers"][0]["name"] = "trainer"
    assert any("named `pytorch`" in p for p in checks.semantic_problems(bad, cfg))
    bad = copy.deepcopy(rendered)
    spec = bad.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    del spec["initContainers"][0]["restartPolicy"]
    spec["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    problems = checks.semantic_problems(bad, cfg)
    assert any("restartPolicy: must be Always" in p for p in problems)
    assert any("limits add up to 7" in p for p in problems)
    bad.job["spec"]["nprocPerNode"] = 6
    bad.job["spec"]["runPolicy"]["cleanPolicy"] = "None"
    crd = checks.crd_problems(bad.job)
    assert any("nprocPerNode" in p for p in crd) and any("cleanPolicy" in p for p in crd)


CACHE_ENV = (
    "HF_HOME",
    "HOME",
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "MPLCONFIGDIR",
)


def _writable_mounts(container: dict[str, Any]) -> set[str]:
    return {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}


@pytest.mark.parametrize(
    "config", [DATA / "sidecar.yaml", REPO / "configs" / "quickstart.yaml"], ids=["sidecar", "quickstart"]
)
def test_should_run_the_trainer_locked_down_with_a_read_only_root(config: Path) -> None:
    _, rendered = _render(config)
    for spec in _pods(rendered).values():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        (trainer,) = spec["containers"]
        assert trainer["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        # Writable only where needed: output PVC, /tmp (scratch + kernel caches), /dev/shm, and /weights
        # when there is a sidecar to hand weights to. The config volume stays read-only.
        expected = {"/mnt/userloop", "/tmp", "/dev/shm"} | (
            {"/weights"} if "initContainers" in spec else set()
        )
        assert _writable_mounts(trainer) == expected
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "8Gi"}
        # Every cache a library writes to lies on a writable mount, not on the read-only root.
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        for name in CACHE_ENV:
            assert any(env[name] == m or env[name].startswith(m + "/") for m in expected), (name, env[name])


def test_should_keep_the_sidecar_locked_down_except_its_documented_writable_root() -> None:
    _, rendered = _render(DATA / "sidecar.yaml")
    for spec in _pods(rendered).values():
        (sidecar,) = spec["initContainers"]
        assert sidecar["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": False,  # the exception: SGLang JIT-compiles kernels and writes caches
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    # The exception is written down where operators look: the chart's values and the launcher docs.
    assert "documented exception" in (REPO / "helm" / "userloop" / "values.yaml").read_text()
    assert "SGLang sidecar keeps a writable root filesystem" in (REPO / "docs" / "launcher.md").read_text()


def test_should_size_tmp_from_the_config() -> None:
    _, rendered = _render(DATA / "sidecar.yaml", ["cluster.tmp_size=20Gi"])
    volumes = {v["name"]: v for v in _pods(rendered)["Master"]["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "20Gi"
