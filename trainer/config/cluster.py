"""The ``cluster`` section of the run config: how ``launcher submit`` runs the config as a Kubeflow PyTorchJob.

Only the launcher reads it (the trainer carries it along untouched). Checks that need nothing but this
section live here (names, quantities, the GPU split); checks that also need the rest of the run config
(the run name's length, the PVC access mode for several nodes) live in ``RunConfig``. Imports only
pydantic, like the rest of ``trainer.config``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.base import Section

# Each submission is named ``<config name>-<RUN_SUFFIX_LEN - 1 characters>``; see launcher/values.py.
RUN_SUFFIX_LEN = 9
# Kubernetes versions below this lack native sidecars (init containers with restartPolicy: Always).
MIN_K8S_MINOR = 29
# The defaults of cluster.image, .sglang_image and .vllm_image name repositories nobody publishes to: each user
# builds docker/ and pushes to their own registry (docker/README.md). They stay the defaults so that
# `launcher render` works on any config; `launcher submit` refuses them (any tag).
DEFAULT_IMAGE = "ghcr.io/userloop/trainer:0.1.0"
DEFAULT_SGLANG_IMAGE = "ghcr.io/userloop/sglang:v0.5.19-cu129"
# docker/vllm.Dockerfile's tag: the release trainer.engines.vllm.VLLM_VERSION names.
DEFAULT_VLLM_IMAGE = "ghcr.io/userloop/vllm:v0.32.0"
PLACEHOLDER_REPOSITORIES = ("ghcr.io/userloop/trainer", "ghcr.io/userloop/sglang", "ghcr.io/userloop/vllm")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The API server's resource.Quantity grammar (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def dns1123_label(value: str, what: str = "name") -> str:
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid Kubernetes {what}: use at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def dns1123_subdomain(value: str, what: str = "name") -> str:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a valid Kubernetes {what}: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return value


def quantity(value: str | int | float) -> str:
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return text


def _repository(image: str) -> str:
    """``registry/name`` of ``registry/name:tag@sha256:...``."""
    image = image.split("@", 1)[0]
    head, _, tail = image.rpartition(":")
    return head if head and "/" not in tail else image


def pinned_image(value: str) -> str:
    # A tag-less or :latest image changes under a running job when a node pulls again.
    name = value.rsplit("/", 1)[-1]
    if "@sha256:" not in value and (":" not in name or name.endswith(":latest")):
        raise ValueError(
            f"{value!r} is not pinned: add a released tag (repo/image:1.2.3) or a digest (@sha256:...)"
        )
    return value


class PvcConfig(Section):
    name: str = Field(
        "userloop-runs",
        description="PersistentVolumeClaim that holds every run's output (checkpoints, logs/metrics.jsonl, plots). "
        "Shared by all runs and never deleted by the launcher.",
    )
    create: bool = Field(
        False,
        description="Create the claim on submit when it does not exist yet. Leave false to use a claim your cluster "
        "admin made (see k8s/pvc-rwx.yaml).",
    )
    size: str = Field("200Gi", description="Requested storage when `create` is true.")
    storage_class: str | None = Field(
        None, description="StorageClass of a created claim; unset uses the cluster's default class."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteMany",
        description="Access mode of the claim. Pods of a multi-node run sit on different nodes and all mount it, so "
        "`nodes > 1` needs ReadWriteMany. `launcher doctor` compares this with the real claim.",
    )
    mount_path: str = Field(
        "/mnt/userloop",
        description="Where the claim is mounted in the pods. The run's `output_dir` becomes "
        "`<mount_path>/runs/<run name>` in the pod, whatever it is locally.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns1123_subdomain(v, "claim name")

    @field_validator("storage_class")
    @classmethod
    def _storage_class(cls, v: str | None) -> str | None:
        return None if v is None else dns1123_subdomain(v, "StorageClass name")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        return quantity(v)

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") in ("", "/etc/userloop", "/dev/shm", "/weights"):
            raise ValueError(
                f"{v!r}: use an absolute path that is not /, /etc/userloop, /dev/shm or /weights"
            )
        return v.rstrip("/")


class ApiKeySecretConfig(Section):
    name: str = Field(
        description="Secret holding the user simulator's / judge's API key (create it with the command in "
        "k8s/README.md). Only its name reaches the manifests, never the key."
    )
    key: str = Field("api-key", description="Key inside the Secret.")
    env: str = Field(
        "USERLOOP_API_KEY",
        description="Environment variable the key becomes in the `pytorch` container (via secretKeyRef). Must equal "
        "`user_simulator.api_key_env` once the config has a user simulator.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns1123_subdomain(v, "Secret name")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if len(v) > 253 or not _SECRET_KEY.match(v):
            raise ValueError(f"{v!r} is not a valid Secret key: letters, digits, '-', '_' and '.'")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name (letters, digits, '_')")
        return v


class TrainerResources(Section):
    cpu: str = Field("8", description="CPU request and limit of the container (e.g. `8`, `7500m`).")
    memory: str = Field(
        "64Gi",
        description="Memory request and limit (e.g. `64Gi`). In-memory volumes (`shm_size`, `weights_size`) are "
        "charged to the container that writes them: leave room.",
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, v: str | int | float) -> str:
        return quantity(v)


class SidecarResources(TrainerResources):
    cpu: str = Field("4", description="CPU request and limit of the rollout sidecar.")
    memory: str = Field("32Gi", description="Memory request and limit of the rollout sidecar.")


class ResourcesConfig(Section):
    trainer: TrainerResources = Field(
        default_factory=TrainerResources, description="Requests/limits of the `pytorch` (trainer) container."
    )
    sglang: SidecarResources = Field(
        default_factory=SidecarResources, description="Requests/limits of the `sglang` sidecar."
    )
    vllm: SidecarResources = Field(
        default_factory=SidecarResources, description="Requests/limits of the `vllm` sidecar."
    )


class SglangSidecarConfig(Section):
    port: int = Field(
        30000,
        ge=1024,
        le=65535,
        description="Port of the SGLang server; the trainer reaches it at 127.0.0.1:<port> (env USERLOOP_SGLANG_URL).",
    )
    mem_fraction_static: float = Field(
        0.85,
        gt=0,
        lt=1,
        description="`--mem-fraction-static`: share of the sidecar GPUs' memory for weights + KV cache.",
    )
    max_loaded_loras: int = Field(
        2,
        ge=1,
        description="`--max-loaded-loras` when LoRA is on: the serving adapter plus the next version. The "
        "sidecar also gets `--max-loras-per-batch 2` (a batch holds the serving adapter and base-only requests): "
        "SGLang refuses a per-batch limit above this one, and its default is 8.",
    )
    startup_timeout_s: int = Field(
        600,
        ge=60,
        description="How long the startup probe waits for `/health_generate` before the kubelet restarts the "
        "sidecar (model download + load + CUDA graphs; 1-2 min for small models).",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More `sglang.launch_server` flags, appended as given, e.g. [--context-length, '8192'].",
    )


class VllmSidecarConfig(Section):
    port: int = Field(
        8000,
        ge=1024,
        le=65535,
        description="Port of the vLLM server; the trainer reaches it at 127.0.0.1:<port> (env USERLOOP_VLLM_URL).",
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        lt=1,
        description="`--gpu-memory-utilization`: share of the sidecar GPUs' memory for weights + KV cache.",
    )
    max_loras: int = Field(
        2,
        ge=1,
        description="`--max-loras` when LoRA is on: adapters in one batch; the serving adapter plus the next version.",
    )
    startup_timeout_s: int = Field(
        600,
        ge=60,
        description="How long the startup probe waits for `/health` (vLLM listens once the model is loaded and "
        "warmed up) before the kubelet restarts the sidecar.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More `vllm.entrypoints.openai.api_server` flags, appended as given, e.g. [--max-model-len, '8192'].",
    )


class Toleration(Section):
    key: str | None = Field(None, description="Taint key; unset with operator Exists tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field(
        "Equal", description="`Equal` matches `value`; `Exists` any value."
    )
    value: str | None = Field(None, description="Taint value for `Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; unset tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: how long the pod stays after the taint."
    )


class ClusterConfig(Section):
    namespace: str = Field("default", description="Namespace of the run's objects.")
    api: Literal["pytorchjob", "trainjob"] = Field(
        "pytorchjob",
        description="Job API the run is submitted as: `pytorchjob` (Kubeflow training-operator v1, PyTorchJob "
        "`kubeflow.org/v1`) or `trainjob` (Kubeflow Trainer v2, a TrainJob plus the ClusterTrainingRuntime holding "
        "its pod, run as a JobSet; needs rights to create ClusterTrainingRuntimes). Same pod either way; "
        "`launcher doctor` says which the cluster serves. docs/launcher.md compares restarts and TTL.",
    )
    image: str = Field(
        DEFAULT_IMAGE,
        description="Trainer image (docker/Dockerfile: CUDA PyTorch + `userloop[train]`). Pin a tag or digest.",
    )
    sglang_image: str = Field(
        DEFAULT_SGLANG_IMAGE,
        description="SGLang sidecar image (docker/sglang.Dockerfile, pinned to a released SGLang). Its HTTP API "
        "changes between releases: pin it.",
    )
    vllm_image: str = Field(
        DEFAULT_VLLM_IMAGE,
        description="vLLM sidecar image (docker/vllm.Dockerfile, pinned to vLLM 0.32): the sidecar of "
        "`rollout.engine: vllm`. Its dev and weight-update routes change between releases: pin it.",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Pull policy of both images."
    )
    nodes: int = Field(
        1, ge=1, le=1000, description="Pods (one per node): 1 Master plus `nodes - 1` Workers."
    )
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=16,
        description="`nvidia.com/gpu` per pod, split between the trainer and the rollout sidecar. 0 runs on CPU.",
    )
    rollout_gpus_per_node: int = Field(
        0,
        ge=0,
        description="GPUs of each pod given to the rollout sidecar (SGLang or vLLM, by `rollout.engine`; its "
        "tensor-parallel size); the rest go to the trainer (one torchrun process each). 0 runs no sidecar.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of each trainer GPU in GB, for the memory estimate of `launcher validate`/`render` "
        "(`parallel.check_memory`). Unset: read from `node_selector`'s `nvidia.com/gpu.memory` (MiB) or "
        "`nvidia.com/gpu.product` (e.g. NVIDIA-H100-80GB-HBM3); when neither says, the fit is not checked.",
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="CPU and memory per container."
    )
    shm_size: str = Field(
        "16Gi", description="Size of the in-memory /dev/shm in each container (NCCL and data loaders use it)."
    )
    weights_size: str = Field(
        "32Gi",
        description="Size of the in-memory volume at /weights shared by trainer and sidecar: the trainer writes new "
        "weights or LoRA adapters there and the sidecar loads them (the two hold disjoint GPUs, so no CUDA IPC).",
    )
    tmp_size: str = Field(
        "8Gi",
        description="Size of the trainer's /tmp volume (an emptyDir): its root filesystem is read-only, so scratch "
        "files and the triton / torchinductor / matplotlib caches go there. Counts against the node's ephemeral "
        "storage.",
    )
    sglang: SglangSidecarConfig = Field(
        default_factory=SglangSidecarConfig, description="SGLang sidecar settings."
    )
    vllm: VllmSidecarConfig = Field(default_factory=VllmSidecarConfig, description="vLLM sidecar settings.")
    pvc: PvcConfig = Field(default_factory=PvcConfig, description="Persistent storage for the run's output.")
    api_key_secret: ApiKeySecretConfig | None = Field(
        None,
        description="Secret with the API key of the user simulator / judge; unset when the run calls no API.",
    )
    service_account: str = Field(
        "userloop",
        description="ServiceAccount of the pods (created on submit when missing; its token is not mounted: the "
        "trainer never calls the API server).",
    )
    queue: str | None = Field(
        None,
        description="Kueue LocalQueue (label `kueue.x-k8s.io/queue-name`); unset submits straight to the scheduler.",
    )
    priority_class: str | None = Field(None, description="PriorityClass of the pods.")
    gang_scheduling: bool = Field(
        False,
        description="Fill `runPolicy.schedulingPolicy` (Volcano / scheduler-plugins), with `minResources` counting "
        "the sidecar GPUs the operator's own total misses.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the pods require, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations (a `nvidia.com/gpu` one is always added for GPU pods).",
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for private registries.")
    restart_policy: Literal["ExitCode", "OnFailure", "Never", "Always"] = Field(
        "ExitCode",
        description="Replica restart policy. `ExitCode` recreates the pod after the exits the training-operator "
        "counts as transient (130 SIGINT, 137 SIGKILL/OOM, 138 SIGUSR1, 143 SIGTERM: the trainer's preemption exit) and "
        "fails the job on every other code, the trainer's own errors (1-127: a bad config does not loop) and crashes "
        "such as 139 SIGSEGV included.",
    )
    backoff_limit: int = Field(3, ge=0, description="Restarts before the job is marked Failed.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job after this many seconds of running; unset: no deadline."
    )
    ttl_seconds_after_finished: int | None = Field(
        604800,
        ge=0,
        description="Delete the finished job, its pods (and their logs) and its ConfigMap after this many seconds; "
        "unset keeps them. Output on the PVC stays.",
    )
    termination_grace_period_seconds: int = Field(
        120,
        ge=0,
        description="Time between SIGTERM and SIGKILL: enough for the trainer to finish a checkpoint.",
    )
    run_as_user: int = Field(
        1000,
        ge=1,
        description="UID (and GID, fsGroup) of both containers; the images in docker/ create this user.",
    )
    k8s_version: str = Field(
        "1.29",
        description="Kubernetes version whose schemas `render`/`submit` validate against offline (>= 1.29).",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object and pod.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the job and its pods."
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return dns1123_label(v, "namespace")

    @field_validator("service_account", "queue", "priority_class")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        return None if v is None else dns1123_subdomain(v)

    @field_validator("image_pull_secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        return [dns1123_subdomain(s, "Secret name") for s in v]

    @field_validator("image", "sglang_image", "vllm_image")
    @classmethod
    def _pinned(cls, v: str) -> str:
        return pinned_image(v)

    @field_validator("shm_size", "weights_size", "tmp_size", mode="before")
    @classmethod
    def _quantity(cls, v: str | int | float) -> str:
        return quantity(v)

    @field_validator("k8s_version", mode="before")
    @classmethod
    def _k8s_version(cls, v: str | float) -> str:
        if isinstance(v, float) and len(str(v).split(".")[1]) < 2:
            # YAML reads an unquoted 1.30 as the float 1.3.
            raise ValueError(f"{v!r} is ambiguous (YAML turned 1.30 into 1.3): quote it, e.g. '1.30'")
        m = re.fullmatch(r"v?1\.(\d+)(\.\d+)?", str(v))
        if not m:
            raise ValueError(f"{v!r}: expected a Kubernetes version like 1.29 or 1.33")
        if int(m.group(1)) < MIN_K8S_MINOR:
            raise ValueError(f"{v!r}: native sidecars need Kubernetes 1.{MIN_K8S_MINOR} or newer")
        return f"1.{m.group(1)}"

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _QUALIFIED_NAME.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
                raise ValueError(
                    f"{key!r} is not a valid label key (prefix/name, name at most 63 characters)"
                )
            if len(str(value)) > 63 or not _LABEL_VALUE.match(str(value)):
                raise ValueError(
                    f"{key}: {value!r} is not a valid label value (at most 63 letters, digits, '-_.')"
                )
        return v

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _QUALIFIED_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid annotation key")
        return v

    @model_validator(mode="after")
    def _trainjob(self) -> ClusterConfig:
        # A TrainJob's pods belong to a batch Job, which accepts only restartPolicy Never or OnFailure, and
        # Trainer gangs pods through its runtime's podGroupPolicy, not a PyTorchJob schedulingPolicy.
        if self.api == "trainjob" and self.restart_policy == "Always":
            raise ValueError(
                "restart_policy Always cannot be a TrainJob's: its pods belong to a Job, which never restarts a "
                "pod that succeeded; set cluster.restart_policy to ExitCode or OnFailure"
            )
        if self.api == "trainjob" and self.gang_scheduling:
            raise ValueError(
                "gang_scheduling fills a PyTorchJob's runPolicy.schedulingPolicy, which a TrainJob has not; with "
                "cluster.api trainjob set cluster.queue instead (Kueue admits the whole TrainJob at once) and "
                "cluster.gang_scheduling: false"
            )
        return self

    @model_validator(mode="after")
    def _gpu_split(self) -> ClusterConfig:
        if self.gpus_per_node == 0 and self.rollout_gpus_per_node > 0:
            raise ValueError(
                f"rollout_gpus_per_node is {self.rollout_gpus_per_node} but gpus_per_node is 0: the SGLang sidecar "
                "needs GPUs; set cluster.gpus_per_node or cluster.rollout_gpus_per_node: 0"
            )
        if self.gpus_per_node > 0 and self.rollout_gpus_per_node >= self.gpus_per_node:
            raise ValueError(
                f"rollout_gpus_per_node ({self.rollout_gpus_per_node}) leaves no GPU for the trainer out of "
                f"gpus_per_node ({self.gpus_per_node}): lower cluster.rollout_gpus_per_node or raise "
                "cluster.gpus_per_node"
            )
        return self

    @property
    def trainer_gpus(self) -> int:
        """GPUs of the `pytorch` container in each pod."""
        return self.gpus_per_node - self.rollout_gpus_per_node

    @property
    def sidecar(self) -> bool:
        return self.rollout_gpus_per_node > 0

    def placeholder_images(self, engine: str = "sglang") -> dict[str, str]:
        """``{"cluster.image": image, ...}`` for each image the pods would run that nobody publishes; ``engine``
        (``rollout.engine``) picks the sidecar's image."""
        used = {"cluster.image": self.image}
        if self.sidecar:
            field = "vllm_image" if engine == "vllm" else "sglang_image"
            used[f"cluster.{field}"] = getattr(self, field)
        return {
            field: image for field, image in used.items() if _repository(image) in PLACEHOLDER_REPOSITORIES
        }
