"""Kubernetes commands of ``launcher``: render, submit, status, logs, list, delete, doctor.

``register(app)`` adds them to the Typer app of ``launcher/cli.py``. ``render`` and ``submit --dry-run``
never connect to a cluster; every other command builds one ``Cluster`` (``cluster.py``, the only module
that calls the API server). Heavy imports (Helm's library, the kubernetes client) happen inside the
commands so that ``launcher --help`` stays fast.

Exit codes: 0 success; 1 a failed job or a cluster error (the API server refused a request, or could not be
reached: one line naming its URL and the cause); 2 bad config or input (always before any cluster call,
placeholder images included); 124 ``--wait`` timed out.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from trainer.errors import UserError, report

F = TypeVar("F", bound=Callable[..., Any])

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config value: dotted.key=value (value parsed as YAML). Repeatable."
    ),
]
NameArg = Annotated[
    str,
    typer.Argument(help="Run name (as printed by submit; `launcher list` shows them).", show_default=False),
]
KubeconfigOpt = Annotated[
    str | None, typer.Option(help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).")
]
ContextOpt = Annotated[str | None, typer.Option(help="Kubeconfig context (default: the current one).")]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="Namespace (default: the config's, else the context's)."),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output format: text or json.")]
# Tests poll fast; people never need to change it.
PollOpt = Annotated[float, typer.Option(hidden=True)]


def _handled(fn: F) -> F:
    """Known errors -> ``Error:``/``Hint:`` lines and their exit code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise typer.Exit(report(e)) from None

    return wrapper  # type: ignore[return-value]


def _load(config: Path, overrides: list[str] | None, namespace: str | None = None) -> Any:
    from trainer.config import load_config

    # Input paths are not checked here: they are paths inside the pod (image or PVC), not on this machine.
    extra = [f"cluster.namespace={namespace}"] if namespace else []
    return load_config(config, [*(overrides or []), *extra])


_BUILD_IMAGES = "build and push the images of docker/ (docker/README.md)"
_EXAMPLE_IMAGES = {  # the tags docker/README.md builds
    "cluster.image": "ghcr.io/<you>/userloop-trainer:0.1.0",
    "cluster.sglang_image": "ghcr.io/<you>/userloop-sglang:v0.5.19-cu129",
    "cluster.vllm_image": "ghcr.io/<you>/userloop-vllm:v0.32.0",
}


def _refuse_placeholder_images(cfg: Any, config: Path) -> None:
    """A pod with an image nobody publishes sits in ImagePullBackOff while the job never fails: stop here."""
    found = list(cfg.cluster.placeholder_images(cfg.rollout.engine).items())
    if not found:
        return
    fields = " and ".join(field for field, _ in found)
    examples = " ".join(f"--set {field}={_EXAMPLE_IMAGES[field]}" for field, _ in found)
    raise UserError(
        str(config),
        [f"{field}: {image} is a placeholder: no such image is published" for field, image in found],
        hint=f"{_BUILD_IMAGES}, then set {fields} to them, e.g. {examples} (or in the config's cluster section)",
    )


def _notes(cfg: Any) -> list[str]:
    """``warning:``/``info:`` lines of render and submit: placeholder images, where the pod's API key comes from."""
    from trainer.config import memory
    from trainer.config.api_keys import api_key_vars

    lines = [line if line.startswith("warning: ") else f"info: {line}" for line in memory.check(cfg)]
    lines += [
        f"warning: {field}: {image} is a placeholder nobody publishes: `launcher submit` refuses it; "
        f"{_BUILD_IMAGES}, then set {field}"
        for field, image in cfg.cluster.placeholder_images(cfg.rollout.engine).items()
    ]
    secret = cfg.cluster.api_key_secret
    by_var: dict[str, list[str]] = {}
    for field, var in api_key_vars(cfg).items():
        by_var.setdefault(var, []).append(field)
    for var, fields in by_var.items():
        if secret is not None and secret.env == var:  # otherwise the offline checks have refused the config
            lines.append(
                f"info: {', '.join(fields)}: in the pod {var} comes from key {secret.key} of the Secret "
                f"{secret.name} (namespace {cfg.cluster.namespace}; `launcher doctor CONFIG` checks it exists), "
                "not from this machine"
            )
    return lines


def _render_checked(cfg: Any, run: str | None, k8s_versions: list[str] | None = None) -> Any:
    from launcher import checks
    from launcher.render import render
    from launcher.values import run_name
    from trainer.config import memory

    memory.check(cfg)  # a plan whose estimated per-GPU memory cannot fit is refused before anything renders
    rendered = render(cfg, run or run_name(cfg))
    checks.check(rendered, cfg, k8s_versions)
    return rendered


def _connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Any:
    from launcher.cluster import Cluster

    return Cluster(kubeconfig=kubeconfig, context=context, namespace=namespace)


def _check_output(output: str) -> None:
    if output not in ("text", "json"):
        raise UserError("--output", f"{output!r}: use text or json")


def _check_run_name(run: str | None, cfg: Any) -> None:
    from trainer.config.cluster import dns1123_label

    if run is None:
        return
    try:
        dns1123_label(run, "run name")
    except ValueError as e:
        raise UserError("--run-name", str(e)) from None
    if not run.startswith(f"{cfg.name}-") and run != cfg.name:
        raise UserError("--run-name", f"{run!r} must start with the config name {cfg.name!r} and '-'")


# ----------------------------------------------------------------------------- offline


@_handled
def render_cmd(
    config: ConfigArg,
    set: SetOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", "-o", help="Write one file per object here.")
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="Run name (default: config name + time + random).")
    ] = None,
    k8s_version: Annotated[
        list[str] | None,
        typer.Option(help="Validate against these Kubernetes versions (default: cluster.k8s_version)."),
    ] = None,
) -> None:
    """Render the manifests of one submission and validate them offline; never touches a cluster."""
    from launcher.render import write

    cfg = _load(config, set)
    _check_run_name(run_name, cfg)
    rendered = _render_checked(cfg, run_name, k8s_version)
    for line in _notes(cfg):
        print(line, file=sys.stderr)
    versions = ", ".join(k8s_version or [cfg.cluster.k8s_version])
    if out_dir is None:
        sys.stdout.write(rendered.to_yaml())
    else:
        for path in write(rendered, out_dir):
            print(path)
    print(
        f"rendered {rendered.run}: {len(rendered.objects)} objects, valid for Kubernetes {versions} and the "
        f"{' and '.join(o['kind'] for o in [*rendered.runtimes, rendered.job])} CRD",
        file=sys.stderr,
    )


@_handled
def submit_cmd(
    config: ConfigArg,
    set: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option(help="Render and validate only; print the manifests; never connect.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Wait for the end: exit 0 Succeeded, 1 Failed, 124 timeout.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 86400.0,
    follow: Annotated[
        bool, typer.Option(help="Stream the master's trainer log (across restarts) until the end.")
    ] = False,
    run_name: Annotated[
        str | None, typer.Option(help="Run name (default: config name + time + random).")
    ] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    output: OutputOpt = "text",
    poll_interval: PollOpt = 5.0,
) -> None:
    """Create the run's ConfigMap and job: a PyTorchJob, or a TrainJob and its ClusterTrainingRuntime
    (`cluster.api`), after offline checks and a server-side dry run."""
    from launcher import runs

    _check_output(output)
    cfg = _load(config, set, namespace)
    _check_run_name(run_name, cfg)
    _refuse_placeholder_images(cfg, config)  # --dry-run too: it promises what submit would send
    rendered = _render_checked(cfg, run_name)
    for line in _notes(cfg):
        print(line, file=sys.stderr)
    if dry_run:
        sys.stdout.write(rendered.to_yaml())
        print(f"dry run: {rendered.run} rendered and validated; nothing was sent", file=sys.stderr)
        return
    cluster = _connect(kubeconfig, context, cfg.cluster.namespace)
    say = (lambda _: None) if output == "json" else runs._print
    for attempt in range(3):
        try:
            runs.submit(cluster, rendered, say=say)
            break
        except runs.RunNameTaken:
            # A generated name (minute + 2 random hex) can collide; an explicit --run-name is the user's.
            if run_name is not None or attempt == 2:
                raise
            rendered = _render_checked(cfg, None)
    ns, run = cluster.namespace, rendered.run
    logs_cmd = rendered.api.logs_command(ns, run)
    if output == "json":
        print(json.dumps({"status": "success", "run": run, "namespace": ns, "logs_command": logs_cmd}))
    else:
        print(f"submitted {run} (namespace {ns})")
        print(rendered.notes.rstrip())
    if not (wait or follow):
        return
    code = 0
    if follow:
        state = runs.follow(
            cluster, run, say=say if output == "text" else runs._print, interval=poll_interval
        )
        code = {"Succeeded": 0}.get(state, 1)
        if state == "Failed":
            for line in runs.failure_report(cluster, run, cluster.get_job(run) or {}):
                print(line)
    if wait and not follow:
        code = runs.wait(
            cluster, run, timeout=timeout, interval=poll_interval, say=runs._print, api=rendered.api
        )
    raise typer.Exit(code)


# ----------------------------------------------------------------------------- against a cluster


@_handled
def status_cmd(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Conditions, replica and pod states, and the last `step` line of a run."""
    from launcher import runs

    _check_output(output)
    info = runs.status(_connect(kubeconfig, context, namespace), name)
    if output == "json":
        print(json.dumps(info))
        return
    print(
        f"{info['name']}: {info['state']} (namespace {info['namespace']}, config {info['config']}, created {info['created']})"
    )
    for c in info["conditions"]:
        print(
            f"  condition {c['type']}={c['status']} {c.get('reason') or ''} {c.get('message') or ''}".rstrip()
        )
    for rtype, counts in info["replicas"].items():
        print(f"  {rtype}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "selector"))
    for pod in info["pods"]:
        states = ", ".join(f"{k} {v}" for k, v in pod["containers"].items())
        print(f"  pod {pod['name']}: {pod['phase']}, restarts {pod['restarts']}; {states}")
    print(f"  last: {info['last_metrics'] or '(no step line yet)'}")


@_handled
def logs_cmd(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream, reconnecting across restarts.")
    ] = False,
    replica: Annotated[
        str | None,
        typer.Option(
            help="PyTorchJob: master-0 (default), worker-0, ...; TrainJob: node-0 (default), node-1, ..."
        ),
    ] = None,
    container: Annotated[
        str | None,
        typer.Option(
            "--container", "-c", help="The trainer (default: pytorch; a TrainJob's: node) or sglang."
        ),
    ] = None,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines (without -f).")] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    poll_interval: PollOpt = 2.0,
) -> None:
    """Print (or stream) a container's log of one pod of a run."""
    from launcher import runs

    cluster = _connect(kubeconfig, context, namespace)
    if follow:
        runs.follow(cluster, name, replica=replica, container=container, interval=poll_interval)
        return
    sys.stdout.write(runs.pod_log(cluster, name, replica, container, tail))


@_handled
def list_cmd(
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    output: OutputOpt = "text",
) -> None:
    """userloop runs in the namespace (PyTorchJobs and TrainJobs with our labels), newest first."""
    from launcher import runs

    _check_output(output)
    rows = runs.list_runs(_connect(kubeconfig, context, namespace))
    if output == "json":
        print(json.dumps(rows))
        return
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("NAME", "CONFIG", "STATE", "NODES", "CREATED")
        for r in rows:
            table.add_row(r["name"], r["config"] or "", r["state"], str(r["nodes"]), r["created"] or "")
        Console().print(table)
        return
    for r in rows:
        print(f"{r['name']}\t{r['config']}\t{r['state']}\t{r['nodes']}\t{r['created']}")


@_handled
def delete_cmd(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Delete a run: its job, pods and ConfigMap (and a TrainJob's ClusterTrainingRuntime). Output on the PVC stays."""
    from launcher import runs
    from launcher.cluster import ClusterError

    if runs.delete(_connect(kubeconfig, context, namespace), name):
        print(f"deleted {name}")
    else:
        raise ClusterError(f"PyTorchJob/{name}", "not found", hint="`launcher list` shows runs")


@_handled
def doctor_cmd(
    config: Annotated[Path | None, typer.Argument(help="Run config whose cluster section to check.")] = None,
    set: SetOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Check that a cluster can run a config: CRD and version, namespace, Secret, PVC, GPU nodes."""
    from launcher.doctor import run_checks

    cfg = _load(config, set, namespace) if config else None
    cluster = _connect(kubeconfig, context, cfg.cluster.namespace if cfg else namespace)
    results = run_checks(cluster, cfg)
    for check in results:
        print(check.line())
    raise typer.Exit(1 if any(c.ok is False for c in results) else 0)


def register(app: typer.Typer) -> None:
    """Add the Kubernetes commands to ``app``."""
    app.command("render")(render_cmd)
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("list")(list_cmd)
    app.command("delete")(delete_cmd)
    app.command("doctor")(doctor_cmd)
