"""Offline checks of rendered manifests, before anything reaches a cluster.

Three layers, all collected into one report:

1. every object against the official Kubernetes JSON schemas of ``cluster.k8s_version`` (PyPI
   ``kubernetes-validate``, strict variant: unknown fields are errors, as with the API server's strict
   field validation); the Kubernetes types inside custom objects too (the PyTorchJob's pod templates,
   the ClusterTrainingRuntime's Job template), so a field newer than the cluster is caught;
2. each custom object against its CRD's ``openAPIV3Schema`` (copies of the training-operator's
   PyTorchJob CRD and of Kubeflow Trainer's TrainJob and ClusterTrainingRuntime CRDs ship in
   ``launcher/crds/``), made strict the way the API server prunes: an object with ``properties`` and no
   ``x-kubernetes-preserve-unknown-fields`` admits nothing else (CEL rules are not evaluated);
3. semantic rules a cluster would otherwise teach the hard way (``semantic_problems``) and a scan for
   API key values anywhere in the output (``secret_problems``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from launcher.render import Rendered
from trainer.config import RunConfig
from trainer.config.api_keys import SECRET_NAME as _SECRET_NAME  # names whose values stay out of manifests
from trainer.config.api_keys import api_key_vars
from trainer.errors import UserError

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_PATH = CRD_DIR / "kubeflow.org_pytorchjobs.yaml"
# The CRD copy of each custom kind the chart renders (launcher/crds/, package data).
CRD_PATHS = {
    "PyTorchJob": CRD_PATH,
    "TrainJob": CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml",
    "ClusterTrainingRuntime": CRD_DIR / "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
# Kubernetes types embedded in custom objects: (kind, path to a dict or a list of dicts, definition).
EMBEDDED = {
    "PyTorchJob": [("spec.pytorchReplicaSpecs.*.template", "io.k8s.api.core.v1.PodTemplateSpec")],
    "TrainJob": [],
    "ClusterTrainingRuntime": [
        ("spec.template.spec.replicatedJobs.*.template", "io.k8s.api.batch.v1.JobTemplateSpec")
    ],
}
_DEFS = "/api/_definitions.json"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check(rendered: Rendered, cfg: RunConfig, k8s_versions: Iterable[str] | None = None) -> None:
    """Raise one ``UserError`` listing every problem; silent when the manifests are fine."""
    versions = list(k8s_versions or [cfg.cluster.k8s_version])
    problems: list[str] = []
    for version in versions:
        problems += schema_problems(rendered.objects, version)
    for obj in rendered.objects:
        if obj["kind"] in CRD_PATHS:
            problems += crd_problems(obj)
    problems += semantic_problems(rendered, cfg)
    problems += secret_problems(rendered.to_yaml(), cfg)
    if problems:
        raise UserError(
            f"rendered manifests for {rendered.run}",
            list(dict.fromkeys(problems)),
            hint="fix the config's cluster section; if it looks right, report a chart bug with `launcher render -o DIR`",
        )


# ----------------------------------------------------------------------------- Kubernetes schemas


def supported_versions() -> list[str]:
    """Minor versions whose schemas kubernetes-validate ships (``1.25`` ... ``1.37`` in 1.37.0)."""
    root = _schema_root()
    found = {m.group(1) for p in root.iterdir() if (m := re.match(r"^v(1\.\d+)\.\d+-local-strict$", p.name))}
    return sorted(found, key=lambda v: int(v.split(".")[1]))


def resolve_version(version: str) -> str:
    """The newest shipped schema version not newer than ``version`` (a patch release changes no schema)."""
    minor = int(version.split(".")[1])
    shipped = supported_versions()
    older = [v for v in shipped if int(v.split(".")[1]) <= minor]
    if not older:
        raise UserError("cluster.k8s_version", f"{version}: no schemas older than {shipped[0]} are available")
    return older[-1]


def schema_problems(objects: list[dict[str, Any]], version: str) -> list[str]:
    """Each object (and the Kubernetes types inside custom objects) against the strict schemas of ``version``."""
    version = resolve_version(version)
    problems = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") in EMBEDDED:
            for pattern, definition in EMBEDDED[obj["kind"]]:
                validator = _k8s_validator(version, definition)
                for path, part in _at(obj, pattern.split(".")):
                    problems += _errors(validator, part, f"{where}: {path}", f"Kubernetes {version}")
            continue
        validator = _k8s_validator(version, _definition_name(version, obj))
        problems += _errors(validator, obj, where, f"Kubernetes {version}")
    return problems


def _at(node: Any, keys: list[str], path: str = "") -> list[tuple[str, Any]]:
    """``(path, value)`` for each value at ``keys`` below ``node``; ``*`` is every dict value or list item
    (named by its ``name`` when it has one)."""
    if not keys:
        return [(path, node)]
    key, rest = keys[0], keys[1:]
    if key != "*":
        child = node.get(key) if isinstance(node, dict) else None
        return [] if child is None else _at(child, rest, f"{path}.{key}" if path else key)
    items = node.items() if isinstance(node, dict) else enumerate(node if isinstance(node, list) else [])
    out = []
    for k, v in items:
        label = v.get("name", k) if isinstance(k, int) and isinstance(v, dict) else k
        out += _at(v, rest, f"{path}.{label}")
    return out


def _schema_root() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


@functools.lru_cache(maxsize=8)
def _definitions(version: str) -> dict[str, Any]:
    path = _schema_root() / f"v{version}.0-local-strict" / "_definitions.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _definition_name(version: str, obj: dict[str, Any]) -> str:
    """``apps/v1`` + ``Deployment`` -> ``io.k8s.api.apps.v1.Deployment`` via the schemas' GVK annotations."""
    group, _, ver = obj["apiVersion"].rpartition("/")
    index = _gvk_index(version)
    try:
        return index[(group, ver, obj["kind"])]
    except KeyError:
        raise UserError(
            f"{obj['kind']}/{obj.get('metadata', {}).get('name')}",
            f"no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}",
        ) from None


@functools.lru_cache(maxsize=8)
def _gvk_index(version: str) -> dict[tuple[str, str, str], str]:
    index = {}
    for name, schema in _definitions(version)["$defs"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            index[(gvk.get("group", ""), gvk["version"], gvk["kind"])] = name
    return index


@functools.lru_cache(maxsize=64)
def _k8s_validator(version: str, definition: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    defs = _definitions(version)
    registry = Registry().with_resource(_DEFS, Resource.from_contents(defs))
    schema = {"$schema": defs.get("$schema"), "$ref": f"{_DEFS}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ----------------------------------------------------------------------------- the CRDs


def crd_problems(obj: dict[str, Any], crd_path: Path | None = None) -> list[str]:
    """``obj`` (a PyTorchJob, TrainJob or ClusterTrainingRuntime) against its CRD copy, or ``crd_path``."""
    kind = obj.get("kind", "PyTorchJob")
    where = f"{kind}/{obj.get('metadata', {}).get('name')}"
    path = crd_path or CRD_PATHS[kind]
    return _errors(_crd_validator(str(path), obj.get("apiVersion", ""), kind), obj, where, f"{kind} CRD")


@functools.lru_cache(maxsize=8)
def _crd_validator(crd_path: str, api_version: str, kind: str = "PyTorchJob") -> Any:
    import jsonschema

    crd = yaml.load(Path(crd_path).read_text(encoding="utf-8"), Loader=_Loader)
    version = api_version.rpartition("/")[2]
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise UserError(kind, f"apiVersion {api_version!r} is not served by the CRD (has {sorted(served)})")
    schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 structural schema that rejects the fields the API server would prune."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: strict_schema(v) if k not in ("enum", "default", "example") else copy.deepcopy(v)
        for k, v in node.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    return out


def _errors(validator: Any, instance: Any, where: str, against: str) -> list[str]:
    out = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) for p in err.absolute_path) or "(object)"
        message = err.message if len(err.message) < 300 else err.message[:300] + "..."
        out.append(f"{where}: {path}: {message} ({against})")
    return out


# ----------------------------------------------------------------------------- semantic rules


def _pod_specs(job: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {rt: rs["template"]["spec"] for rt, rs in job["spec"]["pytorchReplicaSpecs"].items()}


def _gpus(container: Mapping[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def semantic_problems(rendered: Rendered, cfg: RunConfig) -> list[str]:
    """The rules of docs/launcher.md, each as ``<object>: <where>: <what>``."""
    c = cfg.cluster
    job = rendered.job
    name = job["metadata"]["name"]
    where = f"{job['kind']}/{name}"
    problems, pods = _STRUCTURE[job["kind"]](rendered, cfg)
    for pod_where, spec in pods.items():
        problems += _pod_problems(pod_where, spec, cfg, rendered.api.trainer_container)
    cms = {o["metadata"]["name"]: o for o in rendered.by_kind("ConfigMap")}
    cm = cms.get(f"{name}-config")
    if cm is None or not cm.get("data", {}).get("config.yaml", "").strip():
        problems.append(f"{where}: the ConfigMap {name}-config with a non-empty config.yaml is missing")
    server = cfg.rollout.server()
    if server is not None and not c.sidecar and not server.url:
        engine = cfg.rollout.engine
        problems.append(
            f"{where}: rollout.engine is {engine} but cluster.rollout_gpus_per_node is 0: the pod runs no "
            f"{_SERVERS[engine][2]} server; give it rollout GPUs or set rollout.{engine}.url to a server the pod "
            "can reach"
        )
    problems += _api_key_problems(cfg)
    return problems


def _pytorchjob_structure(rendered: Rendered, cfg: RunConfig) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Replicas, nprocPerNode, cleanPodPolicy and name lengths of a PyTorchJob; its pod specs by replica."""
    c = cfg.cluster
    job = rendered.job
    name = job["metadata"]["name"]
    where = f"PyTorchJob/{name}"
    problems = []
    specs = job["spec"]["pytorchReplicaSpecs"]
    if specs.get("Master", {}).get("replicas") != 1:
        problems.append(f"{where}: spec.pytorchReplicaSpecs.Master.replicas: must be exactly 1")
    workers = specs.get("Worker", {}).get("replicas", 0)
    if 1 + workers != c.nodes:
        problems.append(f"{where}: replicas: 1 Master + {workers} Workers != cluster.nodes {c.nodes}")
    if not isinstance(job["spec"].get("nprocPerNode"), str):
        problems.append(f"{where}: spec.nprocPerNode: must be a string")
    if job["spec"].get("runPolicy", {}).get("cleanPodPolicy") != "None":
        problems.append(
            f"{where}: spec.runPolicy.cleanPodPolicy: must be None, or pods and their logs vanish"
        )
    longest = f"{name}-worker-{max(workers - 1, 0)}"
    if len(longest) > 63:
        problems.append(f"{where}: pod name {longest!r} is longer than 63 characters")
    return problems, {f"{where}: {rtype}": spec for rtype, spec in _pod_specs(job).items()}


# Set by Trainer's torch plugin (pkg/constants TorchRunReservedEnvNames); a TrainJob that sets one is refused.
_TORCH_RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)


def _trainjob_structure(rendered: Rendered, cfg: RunConfig) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """What Kubeflow Trainer's torch runtime relies on: the TrainJob names the run's ClusterTrainingRuntime,
    whose one replicated job `node` (ancestor label trainer, Indexed, `nodes` pods) runs the pod; node
    counts agree; the restart policy is one a Job accepts."""
    c = cfg.cluster
    job = rendered.job
    name = job["metadata"]["name"]
    where = f"TrainJob/{name}"
    spec = job.get("spec") or {}
    ref = spec.get("runtimeRef") or {}
    runtimes = {o["metadata"]["name"]: o for o in rendered.runtimes}
    runtime = runtimes.get(ref.get("name", ""))
    if ref.get("kind") != "ClusterTrainingRuntime" or runtime is None:
        return [f"{where}: spec.runtimeRef: must name the run's ClusterTrainingRuntime {name}, got {ref}"], {}
    rwhere = f"ClusterTrainingRuntime/{runtime['metadata']['name']}"
    problems = []
    trainer = spec.get("trainer") or {}
    policy = (runtime.get("spec") or {}).get("mlPolicy") or {}
    if trainer.get("numNodes") != c.nodes or policy.get("numNodes") != c.nodes:
        problems.append(f"{where}: spec.trainer.numNodes ({trainer.get('numNodes')}) and {rwhere}: "
                        f"mlPolicy.numNodes ({policy.get('numNodes')}) must both be cluster.nodes {c.nodes}")  # fmt: skip
    if not isinstance(trainer.get("numProcPerNode"), int):
        problems.append(f"{where}: spec.trainer.numProcPerNode: must be an integer")
    if not isinstance(policy.get("torch"), dict):
        problems.append(f"{rwhere}: spec.mlPolicy.torch: must be set, or no PET_* reach torchrun")
    jobs = (((runtime.get("spec") or {}).get("template") or {}).get("spec") or {}).get("replicatedJobs") or []
    if [j.get("name") for j in jobs] != ["node"]:
        problems.append(f"{rwhere}: replicatedJobs: exactly one, named `node` (PET_MASTER_ADDR is "
                        f"<run>-node-0-0.<run>), got {[j.get('name') for j in jobs]}")  # fmt: skip
        return problems, {}
    rjob = jobs[0]
    jspec = (rjob.get("template") or {}).get("spec") or {}
    labels = ((rjob.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if labels.get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
        problems.append(f"{rwhere}: replicatedJobs.node: needs the label trainer.kubeflow.org/trainjob-ancestor-step: "
                        "trainer (Trainer finds the trainer's pods by it)")  # fmt: skip
    counts = (rjob.get("replicas"), jspec.get("parallelism"), jspec.get("completions"))
    if counts != (1, c.nodes, c.nodes) or jspec.get("completionMode") != "Indexed":
        problems.append(f"{rwhere}: replicatedJobs.node: replicas 1, parallelism and completions {c.nodes}, "
                        f"completionMode Indexed (PET_NODE_RANK is the completion index), got {counts}, "
                        f"{jspec.get('completionMode')}")  # fmt: skip
    pod = (jspec.get("template") or {}).get("spec") or {}
    restart = pod.get("restartPolicy")
    if restart not in ("Never", "OnFailure") or (jspec.get("podFailurePolicy") and restart != "Never"):
        problems.append(f"{rwhere}: the pod's restartPolicy {restart!r}: a Job takes Never or OnFailure, and "
                        "Never when it has a podFailurePolicy")  # fmt: skip
    longest = f"{name}-node-0-{c.nodes - 1}"
    if len(longest) > 63:
        problems.append(f"{where}: pod hostname {longest!r} is longer than 63 characters")
    for ct in pod.get("containers", []):
        reserved = sorted(e["name"] for e in ct.get("env", []) if e["name"] in _TORCH_RESERVED_ENV)
        if reserved:
            problems.append(
                f"{rwhere}: {ct['name']}: env {', '.join(reserved)}: set by Trainer's torch plugin"
            )
    return problems, {f"{rwhere}: node": pod}


_STRUCTURE = {"PyTorchJob": _pytorchjob_structure, "TrainJob": _trainjob_structure}


# The sidecar of each server engine: container name, startup probe path, name in messages, URL variable.
_SERVERS = {
    "sglang": ("sglang", "/health_generate", "SGLang", "USERLOOP_SGLANG_URL"),
    "vllm": ("vllm", "/health", "vLLM", "USERLOOP_VLLM_URL"),
}


def _pod_problems(where: str, spec: dict[str, Any], cfg: RunConfig, name: str = "pytorch") -> list[str]:
    """One node's pod; ``name`` is the trainer container's (the job API's)."""
    c = cfg.cluster
    problems = []
    containers = {ct["name"]: ct for ct in spec.get("containers", [])}
    inits = {ct["name"]: ct for ct in spec.get("initContainers", [])}
    if list(containers) != [name]:
        why = "the operator's webhook" if name == "pytorch" else "Kubeflow Trainer's torch plugin"
        problems.append(f"{where}: containers: exactly one, named `{name}` ({why}), got {list(containers)}")
        return problems
    trainer = containers[name]
    if c.sidecar:
        box, ready, _, url_env = _SERVERS.get(cfg.rollout.engine, _SERVERS["sglang"])
        sidecar = inits.get(box)
        if sidecar is None:
            problems.append(f"{where}: initContainers: the {box} sidecar is missing")
        else:
            if sidecar.get("restartPolicy") != "Always":
                problems.append(
                    f"{where}: initContainers.{box}.restartPolicy: must be Always (native sidecar)"
                )
            probe = sidecar.get("startupProbe", {}).get("httpGet", {})
            if probe.get("path") != ready:
                problems.append(f"{where}: initContainers.{box}.startupProbe: must probe {ready}")
            problems += _hand_over_problems(where, trainer, sidecar, spec, url_env)
    total = _gpus(trainer) + sum(_gpus(ct) for ct in inits.values())
    if total != c.gpus_per_node or _gpus(trainer) != c.trainer_gpus:
        problems.append(
            f"{where}: nvidia.com/gpu limits add up to {total} (trainer {_gpus(trainer)}), "
            f"expected cluster.gpus_per_node {c.gpus_per_node} (trainer {c.trainer_gpus})"
        )
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for ct in [trainer, *inits.values()]:
        mounts = {m["mountPath"]: m["name"] for m in ct.get("volumeMounts", [])}
        shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir", {})
        if shm.get("medium") != "Memory":
            problems.append(f"{where}: {ct['name']}: /dev/shm must be an emptyDir with medium Memory")
        pvc = volumes.get(mounts.get(c.pvc.mount_path, ""), {}).get("persistentVolumeClaim", {})
        if pvc.get("claimName") != c.pvc.name:
            problems.append(f"{where}: {ct['name']}: PVC {c.pvc.name} is not mounted at {c.pvc.mount_path}")
    for env in trainer.get("env", []):
        if _SECRET_NAME.search(env["name"]) and "value" in env:
            problems.append(f"{where}: {name}: env {env['name']} has a literal value; use a secretKeyRef")
    return problems


def _hand_over_problems(
    where: str, trainer: dict[str, Any], sidecar: dict[str, Any], spec: dict[str, Any], url_env: str
) -> list[str]:
    """Trainer and sidecar hold disjoint GPUs: new weights go through one in-memory volume both mount at the
    directory the trainer writes to (``USERLOOP_WEIGHTS_DIR``), and the trainer must know the server's URL."""
    env = {e["name"]: e.get("value") for e in trainer.get("env", [])}
    problems = []
    if not env.get(url_env):
        problems.append(f"{where}: {trainer['name']}: env {url_env} (the sidecar's URL) is missing")
    weights = env.get("USERLOOP_WEIGHTS_DIR")
    if not weights:
        return problems + [
            f"{where}: {trainer['name']}: env USERLOOP_WEIGHTS_DIR (the weight hand-over volume) is missing"
        ]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounted = [
        {m["mountPath"]: m["name"] for m in ct.get("volumeMounts", [])}.get(weights)
        for ct in (trainer, sidecar)
    ]
    if mounted[0] is None or mounted[0] != mounted[1]:
        problems.append(f"{where}: the trainer and the {sidecar['name']} sidecar must mount the same volume at {weights} "
                        f"(USERLOOP_WEIGHTS_DIR), got {mounted[0]!r} and {mounted[1]!r}")  # fmt: skip
    elif volumes.get(mounted[0], {}).get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: volume {mounted[0]} at {weights}: must be an emptyDir with medium Memory "
                        "(weights are handed over once per step)")  # fmt: skip
    return problems


def _api_key_problems(cfg: RunConfig) -> list[str]:
    """The trainer reads its keys from the variables its config names: the Secret must provide them."""
    secret = cfg.cluster.api_key_secret
    problems = []
    for field, env in api_key_vars(cfg).items():
        if secret is None:
            problems.append(
                f"cluster.api_key_secret: unset, but {field} is {env}: the pod would have no key; "
                f"set cluster.api_key_secret.name (and env: {env})"
            )
        elif secret.env != env:
            problems.append(f"cluster.api_key_secret.env: {secret.env} must equal {field} ({env})")
    return problems


# ----------------------------------------------------------------------------- secrets


def secret_problems(text: str, cfg: RunConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Names (never values) of secret-looking environment variables whose value occurs in ``text``.

    A config may pull anything from the environment with ``${VAR}``; a key that got into the ConfigMap
    would be readable by anyone who can read ConfigMaps, and would outlive the run in checkpoints.
    """
    environ = os.environ if environ is None else environ
    suspects = {n for n in environ if _SECRET_NAME.search(n)}
    if cfg.cluster.api_key_secret:
        suspects.add(cfg.cluster.api_key_secret.env)
    leaked = sorted(n for n in suspects if len(environ.get(n, "")) >= 8 and environ[n] in text)
    return [
        f"the value of ${n} appears in the rendered manifests: put the key in a Secret "
        "(cluster.api_key_secret) instead of the config"
        for n in leaked
    ]
