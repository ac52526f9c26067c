"""Run config -> Helm values of ``helm/userloop``, and the per-submission run name.

Pure functions over a validated ``RunConfig``: no Helm, no cluster. ``render.py`` passes the result to
Helm's engine; the chart's ``values.schema.json`` checks its shape again on the Helm side.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from trainer.config import RunConfig, dump_config
from trainer.config.cluster import RUN_SUFFIX_LEN

CONFIG_PATH_IN_POD = "/etc/userloop/config.yaml"


def run_name(cfg: RunConfig, now: datetime | None = None, token: str | None = None) -> str:
    """``<config name>-<DDHHMM><2 hex>``: unique per submission, sortable within a month, readable.

    Helm only renders, so every submission is a fresh PyTorchJob; reusing a name would collide with
    the previous run until its TTL deletes it.
    """
    now = now or datetime.now(timezone.utc)
    token = token if token is not None else secrets.token_hex(1)
    suffix = f"{now:%d%H%M}{token}"
    if len(suffix) != RUN_SUFFIX_LEN - 1:  # the config's name-length check counts on this width
        raise ValueError(f"run-name suffix {suffix!r} must have {RUN_SUFFIX_LEN - 1} characters")
    return f"{cfg.name}-{suffix}"


def pod_output_dir(cfg: RunConfig, run: str) -> str:
    return f"{cfg.cluster.pvc.mount_path}/runs/{run}"


def pod_config_yaml(cfg: RunConfig, run: str) -> str:
    """The config the pod reads: the same run, with ``output_dir`` on the PVC."""
    pod_cfg = cfg.model_copy(deep=True)
    pod_cfg.output_dir = pod_output_dir(cfg, run)
    return dump_config(pod_cfg)


def sglang_args(cfg: RunConfig) -> list[str]:
    """``sglang.launch_server`` flags (SGLang 0.5.x) for the sidecar."""
    c = cfg.cluster
    # The kubelet probes the pod IP, so the server cannot listen on 127.0.0.1 only.
    args = [
        "--model-path", cfg.model.path,
        "--host", "0.0.0.0",
        "--port", str(c.sglang.port),
        "--tp-size", str(c.rollout_gpus_per_node),
        "--mem-fraction-static", str(c.sglang.mem_fraction_static),
        "--random-seed", str(cfg.algorithm.seed),
    ]  # fmt: skip
    if cfg.model.dtype != "auto":
        args += ["--dtype", cfg.model.dtype]
    lora = cfg.model.lora
    if lora.enabled:
        # Adapters are loaded at run time as new versioned names (/load_lora_adapter), so the server
        # must reserve LoRA memory for the rank and modules up front.
        modules = ["all"] if lora.target_modules == "all-linear" else list(lora.target_modules)
        # SGLang asserts max_loaded_loras >= max_loras_per_batch, whose default (8) is above ours (2 or more,
        # the config's rule): say both. A batch holds at most the serving adapter and base-only requests
        # (SGLang's health checks), so 2 slots suffice; fewer slots also reserve less GPU memory.
        per_batch = min(2, c.sglang.max_loaded_loras)
        args += [
            "--enable-lora",
            "--max-lora-rank", str(lora.r),
            "--lora-target-modules", *modules,
            "--max-loaded-loras", str(c.sglang.max_loaded_loras),
            "--max-loras-per-batch", str(per_batch),
        ]  # fmt: skip
    return args + list(c.sglang.extra_args)


# The server environment the weight hand-over needs: /collective_rpc, /pause, /weight_info, /server_info
# (dev mode) and /v1/load_lora_adapter (runtime LoRA). The chart's sidecar and `rollout.vllm.launch` set it.
VLLM_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
# vLLM reserves LoRA memory only for these ranks (vllm/config/lora.py MaxLoRARanks).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_args(cfg: RunConfig) -> list[str]:
    """``vllm.entrypoints.openai.api_server`` flags (vLLM 0.32) for the sidecar."""
    c = cfg.cluster
    # The kubelet probes the pod IP, so the server cannot listen on 127.0.0.1 only.
    args = [
        "--model", cfg.model.path,
        "--host", "0.0.0.0",
        "--port", str(c.vllm.port),
        "--tensor-parallel-size", str(c.rollout_gpus_per_node),
        "--gpu-memory-utilization", str(c.vllm.gpu_memory_utilization),
        "--seed", str(cfg.algorithm.seed),
        # Log-probs after temperature: the distribution the trainer scores (rollout/logprob_diff).
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    if cfg.model.dtype != "auto":
        args += ["--dtype", cfg.model.dtype]
    lora = cfg.model.lora
    if lora.enabled:
        # Adapters are loaded at run time under new versioned names, so the server reserves LoRA memory up
        # front, for the smallest rank it supports that holds the adapter's.
        rank = next((r for r in _VLLM_LORA_RANKS if r >= lora.r), lora.r)
        args += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(c.vllm.max_loras)]
    return args + list(c.vllm.extra_args)


def _sidecar_values(cfg: RunConfig, engine: str) -> dict[str, Any]:
    """The chart's ``sglang`` or ``vllm`` value: enabled when the pod runs that engine's sidecar."""
    c = cfg.cluster
    on = c.sidecar and cfg.rollout.engine == engine  # the config refuses a sidecar no engine would use
    server = c.sglang if engine == "sglang" else c.vllm
    resources = c.resources.sglang if engine == "sglang" else c.resources.vllm
    values = {
        "enabled": on,
        "image": c.sglang_image if engine == "sglang" else c.vllm_image,
        "gpus": max(c.rollout_gpus_per_node, 1),
        "cpu": resources.cpu,
        "memory": resources.memory,
        "port": server.port,
        "args": (sglang_args(cfg) if engine == "sglang" else vllm_args(cfg)) if on else [],
        "startupFailureThreshold": -(-server.startup_timeout_s // 10),
    }
    if engine == "vllm":
        values["env"] = dict(VLLM_ENV)
    return values


def to_values(cfg: RunConfig, run: str) -> dict[str, Any]:
    """Every chart value, from the config (the chart's defaults are never relied on)."""
    c = cfg.cluster
    gpus = c.trainer_gpus
    secret = c.api_key_secret
    return {
        "configName": cfg.name,
        "api": c.api,
        "runConfig": pod_config_yaml(cfg, run),
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "imagePullSecrets": list(c.image_pull_secrets),
        "nodes": c.nodes,
        # One torchrun process per trainer GPU; a CPU pod runs one process.
        "nprocPerNode": str(gpus) if gpus > 0 else "1",
        "trainer": {"gpus": gpus, "cpu": c.resources.trainer.cpu, "memory": c.resources.trainer.memory},
        "sglang": _sidecar_values(cfg, "sglang"),
        "vllm": _sidecar_values(cfg, "vllm"),
        "shmSize": c.shm_size,
        "weightsSize": c.weights_size,
        "tmpSize": c.tmp_size,
        "outputDir": pod_output_dir(cfg, run),
        "pvc": {
            "name": c.pvc.name,
            "create": c.pvc.create,
            "size": c.pvc.size,
            "storageClass": c.pvc.storage_class or "",
            "accessMode": c.pvc.access_mode,
            "mountPath": c.pvc.mount_path,
        },
        "apiKeySecret": {
            "name": secret.name if secret else "",
            "key": secret.key if secret else "api-key",
            "env": secret.env if secret else "USERLOOP_API_KEY",
        },
        "serviceAccount": {"create": True, "name": c.service_account},
        "queue": c.queue or "",
        "priorityClass": c.priority_class or "",
        "gangScheduling": {
            "enabled": c.gang_scheduling,
            "minResources": gang_resources(cfg) if c.gang_scheduling else {},
        },
        "nodeSelector": dict(c.node_selector),
        "tolerations": [_toleration(t.model_dump(exclude_none=True)) for t in c.tolerations],
        "restartPolicy": c.restart_policy,
        "runPolicy": {
            "backoffLimit": c.backoff_limit,
            "activeDeadlineSeconds": c.active_deadline_seconds,
            "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
        },
        "terminationGracePeriodSeconds": c.termination_grace_period_seconds,
        "runAsUser": c.run_as_user,
        "labels": dict(c.labels),
        "annotations": dict(c.annotations),
    }


def _toleration(t: dict[str, Any]) -> dict[str, Any]:
    if "toleration_seconds" in t:
        t["tolerationSeconds"] = t.pop("toleration_seconds")
    return t


# ----------------------------------------------------------------------------- quantities

_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity as a number (cores, bytes); enough of the grammar for CPU and memory."""
    m = re.fullmatch(r"([0-9.]+)(e[0-9]+|[a-zA-Z]*)", text)
    if not m or (m.group(2) not in _SUFFIX and not m.group(2).startswith("e")):
        raise ValueError(f"cannot add up the quantity {text!r}")
    number, suffix = Decimal(m.group(1)), m.group(2)
    if suffix.startswith("e"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * Decimal(_SUFFIX[suffix])


def gang_resources(cfg: RunConfig) -> dict[str, str]:
    """The whole gang's resources, sidecars included (the operator's own total counts `pytorch` only)."""
    c = cfg.cluster
    sidecar = c.resources.vllm if cfg.rollout.engine == "vllm" else c.resources.sglang
    per_pod = [c.resources.trainer] + ([sidecar] if c.sidecar else [])
    cpu = sum(parse_quantity(r.cpu) for r in per_pod) * c.nodes
    memory = sum(parse_quantity(r.memory) for r in per_pod) * c.nodes
    out = {"cpu": _cpu_text(cpu), "memory": _bytes_text(memory)}
    if c.gpus_per_node:
        out["nvidia.com/gpu"] = str(c.gpus_per_node * c.nodes)
    return out


def _bytes_text(n: Decimal) -> str:
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if n >= unit and n % unit == 0:
            return f"{int(n // unit)}{suffix}"
    return str(int(n))


def _cpu_text(cores: Decimal) -> str:
    return str(int(cores)) if cores == cores.to_integral_value() else f"{int(cores * 1000)}m"
