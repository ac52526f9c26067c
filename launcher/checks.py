"""Offline checks of rendered manifests, before anything reaches a cluster.

Three layers, all collected into one report:

1. every object against the official Kubernetes JSON schemas of ``cluster.k8s_version`` (PyPI
   ``kubernetes-validate``, strict variant: unknown fields are errors, as with the API server's strict
   field validation); the PyTorchJob's pod templates too, so a field newer than the cluster is caught;
2. the PyTorchJob against its CRD's ``openAPIV3Schema`` (a copy of the training-operator's CRD ships in
   ``launcher/crds/``), made strict the way the API server prunes: an object with ``properties`` and no
   ``x-kubernetes-preserve-unknown-fields`` admits nothing else;
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
from trainer.errors import UserError

CRD_PATH = Path(__file__).resolve().parent / "crds" / "kubeflow.org_pytorchjobs.yaml"
_DEFS = "/api/_definitions.json"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Environment variables whose values must never appear in a manifest.
_SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def check(rendered: Rendered, cfg: RunConfig, k8s_versions: Iterable[str] | None = None) -> None:
    """Raise one ``UserError`` listing every problem; silent when the manifests are fine."""
    versions = list(k8s_versions or [cfg.cluster.k8s_version])
    problems: list[str] = []
    for version in versions:
        problems += schema_problems(rendered.objects, version)
    problems += crd_problems(rendered.job)
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
    """Each object (and each PyTorchJob pod template) against the strict schemas of ``version``."""
    version = resolve_version(version)
    problems = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion") == "kubeflow.org/v1":
            for rtype, spec in obj.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
                path = f"spec.pytorchReplicaSpecs.{rtype}.template"
                validator = _k8s_validator(version, "io.k8s.api.core.v1.PodTemplateSpec")
                problems += _errors(
                    validator, spec.get("template", {}), f"{where}: {path}", f"Kubernetes {version}"
                )
            continue
        validator = _k8s_validator(version, _definition_name(version, obj))
        problems += _errors(validator, obj, where, f"Kubernetes {version}")
    return problems


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


# ----------------------------------------------------------------------------- the PyTorchJob CRD


def crd_problems(job: dict[str, Any], crd_path: Path = CRD_PATH) -> list[str]:
    where = f"PyTorchJob/{job.get('metadata', {}).get('name')}"
    return _errors(_crd_validator(str(crd_path), job.get("apiVersion", "")), job, where, "PyTorchJob CRD")


@functools.lru_cache(maxsize=4)
def _crd_validator(crd_path: str, api_version: str) -> Any:
    import jsonschema

    crd = yaml.load(Path(crd_path).read_text(encoding="utf-8"), Loader=_Loader)
    version = api_version.rpartition("/")[2]
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise UserError(
            "PyTorchJob", f"apiVersion {api_version!r} is not served by the CRD (has {sorted(served)})"
        )
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
    for rtype, spec in _pod_specs(job).items():
        problems += _pod_problems(f"{where}: {rtype}", spec, cfg)
    cms = {o["metadata"]["name"]: o for o in rendered.by_kind("ConfigMap")}
    cm = cms.get(f"{name}-config")
    if cm is None or not cm.get("data", {}).get("config.yaml", "").strip():
        problems.append(f"{where}: the ConfigMap {name}-config with a non-empty config.yaml is missing")
    if cfg.rollout.engine == "sglang" and not c.sidecar and not cfg.rollout.sglang.url:
        problems.append(
            f"{where}: rollout.engine is sglang but cluster.rollout_gpus_per_node is 0: the pod runs no SGLang "
            "server; give it rollout GPUs or set rollout.sglang.url to a server the pod can reach"
        )
    problems += _api_key_problems(cfg)
    return problems


def _pod_problems(where: str, spec: dict[str, Any], cfg: RunConfig) -> list[str]:
    c = cfg.cluster
    problems = []
    containers = {ct["name"]: ct for ct in spec.get("containers", [])}
    inits = {ct["name"]: ct for ct in spec.get("initContainers", [])}
    if list(containers) != ["pytorch"]:
        problems.append(
            f"{where}: containers: exactly one, named `pytorch` (the operator's webhook), got {list(containers)}"
        )
        return problems
    trainer = containers["pytorch"]
    if c.sidecar:
        sidecar = inits.get("sglang")
        if sidecar is None:
            problems.append(f"{where}: initContainers: the sglang sidecar is missing")
        else:
            if sidecar.get("restartPolicy") != "Always":
                problems.append(
                    f"{where}: initContainers.sglang.restartPolicy: must be Always (native sidecar)"
                )
            probe = sidecar.get("startupProbe", {}).get("httpGet", {})
            if probe.get("path") != "/health_generate":
                problems.append(f"{where}: initContainers.sglang.startupProbe: must probe /health_generate")
            problems += _hand_over_problems(where, trainer, sidecar, spec)
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
            problems.append(f"{where}: pytorch: env {env['name']} has a literal value; use a secretKeyRef")
    return problems


def _hand_over_problems(
    where: str, trainer: dict[str, Any], sidecar: dict[str, Any], spec: dict[str, Any]
) -> list[str]:
    """Trainer and sidecar hold disjoint GPUs: new weights go through one in-memory volume both mount at the
    directory the trainer writes to (``USERLOOP_WEIGHTS_DIR``), and the trainer must know the server's URL."""
    env = {e["name"]: e.get("value") for e in trainer.get("env", [])}
    problems = []
    if not env.get("USERLOOP_SGLANG_URL"):
        problems.append(f"{where}: pytorch: env USERLOOP_SGLANG_URL (the sidecar's URL) is missing")
    weights = env.get("USERLOOP_WEIGHTS_DIR")
    if not weights:
        return problems + [
            f"{where}: pytorch: env USERLOOP_WEIGHTS_DIR (the weight hand-over volume) is missing"
        ]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounted = [
        {m["mountPath"]: m["name"] for m in ct.get("volumeMounts", [])}.get(weights)
        for ct in (trainer, sidecar)
    ]
    if mounted[0] is None or mounted[0] != mounted[1]:
        problems.append(f"{where}: the trainer and the sglang sidecar must mount the same volume at {weights} "
                        f"(USERLOOP_WEIGHTS_DIR), got {mounted[0]!r} and {mounted[1]!r}")  # fmt: skip
    elif volumes.get(mounted[0], {}).get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: volume {mounted[0]} at {weights}: must be an emptyDir with medium Memory "
                        "(weights are handed over once per step)")  # fmt: skip
    return problems


def _api_key_problems(cfg: RunConfig) -> list[str]:
    """The trainer reads its keys from the variables its config names: the Secret must provide them."""
    wanted = {}
    for section in ("user_simulator", "judge"):
        env = getattr(getattr(cfg, section, None), "api_key_env", None)
        backend = getattr(getattr(cfg, section, None), "backend", "api")
        if env and backend == "api":
            wanted[f"{section}.api_key_env"] = env
    secret = cfg.cluster.api_key_secret
    problems = []
    for field, env in wanted.items():
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
