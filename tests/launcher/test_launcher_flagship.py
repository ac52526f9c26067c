"""The flagship config, ``configs/intentiongym.yaml``, in the shape our users run IntentionGym (UserRL's seed:
Qwen3-0.6B, SGLang rollouts, two GPUs): ``launcher submit`` renders a PyTorchJob whose every pod holds the
trainer and the SGLang sidecar on one GPU each; more nodes and LoRA render and validate too; on a laptop the
documented overrides of its header make it an in-process run; docs/launcher.md shows the rendered pod."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from launcher_paths import FIXED_TIME, REPO
from typer.testing import CliRunner

from launcher import checks
from launcher.cli import app
from launcher.render import dump_object, render
from launcher.values import run_name
from trainer.config import load_config

FLAGSHIP = REPO / "configs" / "intentiongym.yaml"
DOCS = REPO / "docs" / "launcher.md"
BEGIN, END = "<!-- flagship-pod -->\n", "<!-- /flagship-pod -->\n"
MORE_NODES = ["cluster.nodes=2", "cluster.pvc.access_mode=ReadWriteMany"]
LORA = ["model.lora.enabled=true"]


def _render(overrides: list[str] | None = None):
    cfg = load_config(FLAGSHIP, overrides)
    return cfg, render(cfg, run_name(cfg, now=FIXED_TIME, token="ab"))


def _gpus(container: dict[str, Any]) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overrides", [[], MORE_NODES, LORA, MORE_NODES + LORA], ids=["1-node", "2-nodes", "lora",
                                                                                        "2-nodes-lora"])  # fmt: skip
def test_every_pod_runs_the_trainer_and_sglang_on_one_gpu_each(overrides: list[str]) -> None:
    cfg, rendered = _render(overrides)
    for version in ("1.29", "1.33"):
        assert checks.schema_problems(rendered.objects, version) == []
    assert checks.crd_problems(rendered.job) == []
    assert checks.semantic_problems(rendered, cfg) == []
    job = rendered.job
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (
        specs["Master"]["replicas"] == 1
        and specs.get("Worker", {}).get("replicas", 0) == cfg.cluster.nodes - 1
    )
    for replica in specs.values():
        pod = replica["template"]["spec"]
        (trainer,), (sglang,) = pod["containers"], pod["initContainers"]
        assert (trainer["name"], _gpus(trainer)) == ("pytorch", 1)
        assert (sglang["name"], _gpus(sglang), sglang["restartPolicy"]) == ("sglang", 1, "Always")
        assert sglang["command"] == ["python3", "-m", "sglang.launch_server"]
        args = sglang["args"]
        assert (
            args[args.index("--model-path") + 1] == "Qwen/Qwen3-0.6B"
            and args[args.index("--tp-size") + 1] == "1"
        )
        assert ("--enable-lora" in args) == bool(overrides and LORA[0] in overrides)
        if "--enable-lora" in args:  # a LoRA sidecar that SGLang lets start (test_sglang_contract.py)
            assert args[args.index("--max-loras-per-batch") + 1] == "2"
        assert sglang["startupProbe"]["httpGet"]["path"] == "/health_generate"
        assert sglang["livenessProbe"]["httpGet"]["path"] == "/model_info"
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert (
            env["USERLOOP_SGLANG_URL"] == "http://127.0.0.1:30000"
            and env["USERLOOP_WEIGHTS_DIR"] == "/weights"
        )
        assert any(e["name"] == "DASHSCOPE_API_KEY" and "valueFrom" in e for e in trainer["env"])


def _laptop_overrides() -> list[str]:
    """The ``--set`` items of the header's laptop line (the test reads what users read)."""
    (line,) = [
        x for x in FLAGSHIP.read_text().splitlines() if "launcher run configs/intentiongym.yaml --set" in x
    ]
    words = shlex.split(line.lstrip("# "))
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def test_a_laptop_runs_the_same_file_with_the_overrides_its_header_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop = _laptop_overrides()
    assert laptop == ["rollout.engine=hf", "cluster.rollout_gpus_per_node=0"]
    cfg = load_config(FLAGSHIP, laptop)
    assert cfg.rollout.engine == "hf" and cfg.rollout.server() is None and not cfg.cluster.sidecar
    # As given, the file is the 2-GPU SGLang run; `launcher validate` accepts both where the data is.
    pytest.importorskip(
        "pyarrow", reason="the IntentionGym sample is Parquet (the train extra; not in the launcher-only CI)"
    )
    monkeypatch.chdir(tmp_path)
    from trainer.envs.intentiongym_sample import write_sample

    write_sample(tmp_path / "data", train=4, test=2, seed=0)
    sets = [x for item in laptop for x in ("--set", item)]
    for args in ([], sets):
        result = CliRunner().invoke(app, ["validate", str(FLAGSHIP), *args])
        assert result.exit_code == 0, result.output


def _pod_yaml() -> str:
    _, rendered = _render()
    return dump_object(rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])


def test_docs_show_the_pod_the_flagship_renders() -> None:
    """docs/launcher.md's pod is the rendered one: regenerate with UPDATE_GOLDEN=1 after a chart change."""
    text = DOCS.read_text()
    block = f"```yaml\n{_pod_yaml()}```\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOCS.write_text(text[:start] + block + text[end:])
        text = DOCS.read_text()
    shown = re.search(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    assert shown and shown.group(1) == block, "docs/launcher.md's flagship pod is stale: UPDATE_GOLDEN=1"
    assert yaml.safe_load(shown.group(1).removeprefix("```yaml\n").removesuffix("```\n"))["spec"][
        "initContainers"
    ]
