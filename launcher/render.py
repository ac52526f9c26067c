"""Render ``helm/userloop`` with Helm's own engine (Helm 4 as a library, PyPI ``helm-python-sdk``).

``render(cfg, run)`` turns a validated run config into the objects one submission creates. It never
touches a cluster and never downloads anything: the SDK is a bundled shared library (``libhelm_c``),
and ``Chart.render`` runs offline (its ``lookup`` returns nothing). Validation is ``checks.py``'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.job_apis import JobApi, api_of
from launcher.values import to_values
from trainer.config import RunConfig
from trainer.errors import UserError

# Creation order: shared objects first, the ConfigMap before the job whose pods mount it, a TrainJob's
# runtime before the TrainJob (Trainer's webhook refuses a TrainJob whose runtime does not exist yet).
KIND_ORDER = (
    "ServiceAccount",
    "PersistentVolumeClaim",
    "ConfigMap",
    "ClusterTrainingRuntime",
    "PyTorchJob",
    "TrainJob",
)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Rendered:
    run: str
    namespace: str
    objects: list[dict[str, Any]]
    notes: str = ""
    values: dict[str, Any] = field(default_factory=dict, repr=False)

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def job(self) -> dict[str, Any]:
        """The PyTorchJob or the TrainJob."""
        return next(o for o in self.objects if o["kind"] in ("PyTorchJob", "TrainJob"))

    @property
    def api(self) -> JobApi:
        return api_of(self.job)

    @property
    def runtimes(self) -> list[dict[str, Any]]:
        """The cluster-scoped objects the job needs created first (a TrainJob's ClusterTrainingRuntime)."""
        kind = self.api.runtime.kind if self.api.runtime else None
        return self.by_kind(kind) if kind else []

    def to_yaml(self) -> str:
        return "".join("---\n" + dump_object(o) for o in self.objects)


def chart_dir() -> Path:
    """The chart: ``$USERLOOP_CHART`` if set, else ``launcher/chart``: in a checkout a link to ``helm/userloop``,
    in an installed wheel a copy of it (pyproject's package data), so ``pip install userloop`` renders too."""
    override = os.environ.get("USERLOOP_CHART")
    path = Path(override) if override else Path(__file__).resolve().parent / "chart"
    if not (path / "Chart.yaml").is_file():
        raise UserError(
            str(path),
            "Helm chart not found",
            hint="reinstall userloop, or set USERLOOP_CHART=/path/to/helm/userloop",
        )
    return path


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as literal blocks, readable in review and diffs."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text and not text.startswith(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def dump_object(obj: dict[str, Any]) -> str:
    return yaml.dump(
        obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True
    )


def render(cfg: RunConfig, run: str, values: dict[str, Any] | None = None) -> Rendered:
    """Render one submission; ``values`` overrides ``to_values(cfg, run)`` (tests use it)."""
    import helm_python as helm  # ~50 ms: loaded here so `launcher --help` does not pay for it

    values = values if values is not None else to_values(cfg, run)
    namespace = cfg.cluster.namespace
    try:
        with helm.Chart.load(chart_dir()) as chart:
            manifests = chart.render(values, name=run, namespace=namespace, is_install=True)
    except (helm.HelmValuesError, helm.HelmRenderError, helm.HelmChartLoadError) as e:
        raise UserError(
            "helm/userloop", str(e).strip(), hint="fix the cluster section of the config"
        ) from None
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.load_all(text, Loader=_Loader) if doc)
    objects.sort(
        key=lambda o: KIND_ORDER.index(o["kind"]) if o.get("kind") in KIND_ORDER else len(KIND_ORDER)
    )
    return Rendered(run=run, namespace=namespace, objects=objects, notes=notes.strip() + "\n", values=values)


def write(rendered: Rendered, out_dir: Path) -> list[Path]:
    """One file per object (``kubectl apply -f DIR`` order follows the file names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, obj in enumerate(rendered.objects):
        path = out_dir / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(dump_object(obj), encoding="utf-8")
        paths.append(path)
    return paths
