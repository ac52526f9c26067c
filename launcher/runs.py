"""What ``submit``, ``--wait``, ``--follow``, ``status``, ``list`` and ``delete`` do, over a ``Cluster``.

Works on plain dicts as the API server returns them, for either job API (PyTorchJob or TrainJob: what
differs is described in ``job_apis.py``); every API call goes through ``cluster.Cluster``.
Waiting polls the job every few seconds (one GET, cheap for the server and robust to dropped
connections, unlike a watch). Output is one plain line per state change, fit for CI logs.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from launcher import pruned
from launcher.cluster import Cluster, ClusterError, ClusterUnreachable
from launcher.job_apis import CUSTOM_RESOURCES, PYTORCHJOB, JobApi, api_of, api_of_replica
from launcher.render import Rendered
from trainer.errors import EXIT_FAILED, UserError

EXIT_TIMEOUT = 124  # like coreutils' timeout(1)
FINAL = ("Succeeded", "Failed")
LIST_SELECTOR = "app.kubernetes.io/part-of=userloop,userloop.dev/run"
_STEP_LINE = re.compile(r"^step \d+")
Printer = Callable[[str], None]


def _print(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- submit


class RunNameTaken(UserError):
    """The run's ConfigMap, job or runtime exists already (409): nothing of the run was created."""


def _taken(rendered: Rendered, what: str) -> RunNameTaken:
    return RunNameTaken(
        what,
        f"exists already: the run name {rendered.run} is taken (nothing of the run was created)",
        hint="pass another --run-name, or none for a generated one",
    )


def submit(cluster: Cluster, rendered: Rendered, say: Printer = _print) -> dict[str, Any]:
    """Server-side dry run of everything, then create: shared objects when missing, the ConfigMap, the
    job, and finally the ConfigMap's owner reference to the job (its uid exists only now).

    A TrainJob's ClusterTrainingRuntime is dry-run with the ConfigMap and created before the TrainJob,
    which is dry-run only then: Trainer's webhook refuses a TrainJob whose runtime does not exist yet. If
    the TrainJob is refused, the run's ConfigMap and runtime are deleted again.

    Each dry run's answer is compared with what was sent (``pruned``): a server that drops unknown
    fields instead of rejecting them (before 1.25, or an old CRD) stops the submission here.
    Raises ``RunNameTaken`` when the run's name is in use, so that the caller may pick another."""
    shared = [o for o in rendered.objects if o["kind"] in ("ServiceAccount", "PersistentVolumeClaim")]
    missing = [o for o in shared if cluster.get(o["kind"], o["metadata"]["name"]) is None]
    configmap = rendered.by_kind("ConfigMap")[0]
    runtimes = rendered.runtimes
    for obj in [*missing, configmap, *runtimes, *([] if runtimes else [rendered.job])]:
        if not _dry_run(cluster, rendered, obj, missing):
            missing.remove(obj)  # another submission created the shared object just now
    for obj in missing:
        cluster.create(obj)
        say(f"created {obj['kind']}/{obj['metadata']['name']} (shared by all runs)")
    try:
        cluster.create(configmap)
    except ClusterError as e:
        if e.status == 409:  # taken between the dry run and now
            raise _taken(rendered, f"ConfigMap/{configmap['metadata']['name']}") from None
        raise
    created = [configmap]  # what no job will own if the job is not created
    current = rendered.job
    try:
        for current in runtimes:
            cluster.create(current)
            created.append(current)
        current = rendered.job
        if runtimes:
            _dry_run(cluster, rendered, current, [], removed=created)
        job = cluster.create(current)
    except ClusterError as e:
        _remove(cluster, created)
        if e.status == 409:
            raise _taken(rendered, f"{current['kind']}/{current['metadata']['name']}") from None
        raise
    except UserError:
        _remove(cluster, created)
        raise
    cluster.set_owner(configmap["metadata"]["name"], job)
    return job


def _dry_run(
    cluster: Cluster,
    rendered: Rendered,
    obj: dict[str, Any],
    missing: list[dict[str, Any]],
    removed: list[dict[str, Any]] | None = None,
) -> bool:
    """Dry-run the create of ``obj``; False when it is a shared object that exists already. Raises a
    ``UserError`` saying why the server refused it or which fields it would drop. ``removed``: what was
    created already and is deleted again when this refusal stops the submission (the message says so)."""
    what = f"{obj['kind']}/{obj['metadata']['name']}"
    kept = "nothing was created" if not removed else (
        "the run's " + " and ".join(o["kind"] for o in removed) + " just created were deleted again")  # fmt: skip
    try:
        returned = cluster.create(obj, dry_run=True)
    except ClusterUnreachable:
        raise  # not a rejection: the server never answered
    except ClusterError as e:
        if e.status == 409 and obj in missing:
            return False
        if e.status == 409:
            raise _taken(rendered, what) from None
        if e.status == 403 and not getattr(CUSTOM_RESOURCES.get(obj["kind"]), "namespaced", True):
            raise ClusterError(
                e.source,
                e.problems,
                hint=f"a {obj['kind']} is cluster-scoped, which no namespaced Role can grant: an admin binds a "
                "ClusterRole with create, get and delete on it (docs/launcher.md, TrainJob), or use cluster.api: "
                "pytorchjob",
                status=e.status,
            ) from None
        if e.status in (401, 403):
            raise  # the account's rights, not the manifest: the server's message names the verb
        hint = e.hint
        if e.status == 404 and e.problems[0].endswith(f'namespaces "{cluster.namespace}" not found'):
            hint = f"namespace {cluster.namespace} does not exist: check -n / cluster.namespace, or create it (k8s/namespace.yaml)"  # fmt: skip
        raise UserError(
            what,
            f"the API server rejected it in a dry run ({kept}): {'; '.join(e.problems)}",
            hint=hint or "`launcher render -o DIR` shows the manifests",
        ) from None
    dropped = pruned.dropped_paths(obj, returned)
    if dropped:
        raise UserError(
            what,
            f"the API server would silently drop {len(dropped)} field(s) it does not know ({kept}): "
            f"{', '.join(dropped)}",
            hint=pruned.hint(obj["kind"], dropped),
        )
    return True


def _remove(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    """Delete what a failed submission created (newest first); best effort: the first error stands."""
    for obj in reversed(objects):
        with contextlib.suppress(ClusterError):
            cluster.delete(obj["kind"], obj["metadata"]["name"])


# ----------------------------------------------------------------------------- state


def job_state(job: dict[str, Any]) -> str:
    """Succeeded or Failed when the job API's success or failure condition (a TrainJob's is Complete) is
    True anywhere in the list (not only the last one), else the newest True condition (Created, Running,
    Restarting, Suspended; a TrainJob with ready pods is Running), else Pending."""
    return api_of(job).state(job)


def _container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


# Waiting reasons that never resolve by themselves, with what to do.
_STUCK = {
    "CreateContainerConfigError": "a Secret or ConfigMap is missing: check cluster.api_key_secret (`launcher doctor`)",
    "ImagePullBackOff": "the image cannot be pulled: check cluster.image / cluster.sglang_image and image_pull_secrets",
    "ErrImagePull": "the image cannot be pulled: check cluster.image / cluster.sglang_image and image_pull_secrets",
    "InvalidImageName": "fix cluster.image / cluster.sglang_image",
    "CrashLoopBackOff": "a container keeps crashing: `launcher logs NAME -c sglang` or `-c pytorch`",
}
# Scheduler messages -> what to do.
_SCHEDULING = [
    (
        "Insufficient nvidia.com/gpu",
        "no node has enough free GPUs: check `kubectl describe nodes`, or lower cluster.gpus_per_node",
    ),
    ("Insufficient cpu", "no node has enough free CPU: lower cluster.resources.*.cpu"),
    ("Insufficient memory", "no node has enough free memory: lower cluster.resources.*.memory"),
    (
        "node affinity/selector",
        "no node matches cluster.node_selector: check the labels with `kubectl get nodes --show-labels`",
    ),
    ("untolerated taint", "the nodes are tainted: add cluster.tolerations"),
    (
        "persistentvolumeclaim",
        "the PVC is missing or unbound: `launcher doctor`, or set cluster.pvc.create: true",
    ),
]


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """Pods stuck in a waiting state that will not fix itself (the job does not fail for these)."""
    lines = []
    for pod in pods:
        for cs in _container_statuses(pod):
            reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in _STUCK:
                lines.append(f"{pod['metadata']['name']}/{cs['name']}: {reason}: {_STUCK[reason]}")
    return lines


# Why admission refused a pod the operator tried to create (its FailedCreatePod event) -> what to do.
_POD_REFUSED = [
    ("no PriorityClass with name", "fix cluster.priority_class: `kubectl get priorityclasses` lists them"),
    ("exceeded quota", "the namespace's ResourceQuota is used up: `kubectl describe resourcequota`"),
    ("serviceaccount", "the pods' ServiceAccount is missing: `kubectl apply -f k8s/namespace.yaml`"),
    ("violates PodSecurity", "the namespace's Pod Security level refuses it (docs/launcher.md#security)"),
]


def scheduling_report(
    cluster: Cluster, run: str, pods: list[dict[str, Any]], api: JobApi = PYTORCHJOB
) -> list[str]:
    if not pods:
        # A refused pod leaves no pod to look at: the controller records why (on the PyTorchJob, or on a
        # TrainJob's child Job), and retries.
        kind, name, reason = api.refusal_event
        refused = [e for e in cluster.job_events(run, api) if e.get("reason") == reason]
        if refused:
            newest = max(refused, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            message = newest.get("message", "").strip()
            action = next(
                (a for key, a in _POD_REFUSED if key.lower() in message.lower()),
                f"`kubectl describe {kind.lower()} {name.format(run=run)}`",
            )
            return [f"{run}: the operator cannot create its pods: {message} -> {action}"]
        return [
            f"{run}: no pods yet: is it queued (Kueue: `kubectl get workloads -n {cluster.namespace}`) or suspended?"
        ]
    lines = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        name = pod["metadata"]["name"]
        for event in cluster.pod_events(name):
            if event.get("reason") != "FailedScheduling":
                continue
            message = event.get("message", "")
            action = next(
                (a for key, a in _SCHEDULING if key.lower() in message.lower()), "see `kubectl describe pod`"
            )
            lines.append(f"{name}: not scheduled: {message.strip()} -> {action}")
            break
    return lines + pod_problems(pods)


def failure_report(cluster: Cluster, run: str, job: dict[str, Any], tail: int = 20) -> list[str]:
    """The job's failure message, each failed container's exit code and reason, and its last log lines."""
    lines = []
    api = api_of(job)
    message = api.condition_message(job, "Failed")
    if message:
        lines.append(f"{run}: {message}")
    for pod in cluster.job_pods(run, api):
        name = pod["metadata"]["name"]
        for cs in _container_statuses(pod):
            now = (cs.get("state") or {}).get("terminated")
            before = (cs.get("lastState") or {}).get("terminated")
            term, previous = (now, False) if now and now.get("exitCode") else (before, True)
            if not term or not term.get("exitCode"):
                continue
            detail = f": {term['message'].strip()}" if term.get("message") else ""
            lines.append(
                f"{name}/{cs['name']}: exited {term['exitCode']} ({term.get('reason', 'Error')}){detail}"
            )
            try:
                log = cluster.pod_log(name, cs["name"], tail_lines=tail, previous=previous)
            except ClusterError as e:
                log = f"(logs unavailable: {e.problems[0]})"
            lines += [f"  [{name}/{cs['name']}] {line}" for line in log.rstrip("\n").splitlines()[-tail:]]
    return lines


# ----------------------------------------------------------------------------- wait and follow


def wait(
    cluster: Cluster,
    run: str,
    timeout: float,
    interval: float = 5.0,
    say: Printer = _print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    api: JobApi | None = None,
) -> int:
    """Exit code: 0 Succeeded, 1 Failed (with the reason and last log lines), 124 on timeout (with
    what keeps the pods from running). ``api``: the run's job API; None finds it on the first poll."""
    deadline = clock() + timeout
    last, reported = None, set()
    while True:
        job = cluster.get_job(run, api)
        if job is None:
            say(f"{run}: the {(api or PYTORCHJOB).kind} is gone (deleted, or removed by its TTL)")
            return EXIT_FAILED
        api = api_of(job)
        state = api.state(job)
        if state != last:
            say(f"{run}: {state}")
            last = state
        if state == "Succeeded":
            return 0
        if state == "Failed":
            for line in failure_report(cluster, run, job):
                say(line)
            return EXIT_FAILED
        for line in pod_problems(cluster.job_pods(run, api)):
            if line not in reported:
                reported.add(line)
                say(line)
        if clock() >= deadline:
            say(
                f"{run}: still {state} after {timeout:g} s; the job keeps running (`launcher delete {run}` stops it)"
            )
            for line in scheduling_report(cluster, run, cluster.job_pods(run, api), api):
                if line not in reported:
                    say(line)
            return EXIT_TIMEOUT
        sleep(interval)


def _ts_key(ts: str) -> str:
    """RFC 3339 with nanoseconds trimmed of trailing zeros -> a fixed-width string that sorts in time order."""
    head, _, frac = ts.rstrip("Z").partition(".")
    return f"{head}.{frac:0<9}"


def check_replica(api: JobApi, replica: str | None) -> None:
    if replica is not None and not re.fullmatch(api.replica_pattern, replica):
        raise UserError("--replica", f"{replica!r}: the pods of a {api.kind} are {api.replica_forms}")


def pod_log(
    cluster: Cluster,
    run: str,
    replica: str | None = None,
    container: str | None = None,
    tail: int | None = None,
) -> str:
    """A container's log of one pod of a run; ``replica`` and ``container`` default to the job API's rank-0
    pod and trainer container (the job is looked up only when the replica does not say its API)."""
    api = api_of_replica(replica) if replica else None
    if api is None:
        job = cluster.get_job(run)
        if job is None and replica is None:
            raise ClusterError(
                f"run {run}", f"not found in namespace {cluster.namespace}", hint="`launcher list` shows runs"
            )
        api = api_of(job) if job else PYTORCHJOB
        check_replica(api, replica)
    pod = api.pod_of(run, replica or api.primary_replica, lambda: cluster.job_pods(run, api))
    if pod is None:
        raise ClusterError(f"{api.kind}/{run}", f"no pod of {replica or api.primary_replica} (yet)",
                           hint="`launcher status NAME` lists the run's pods")  # fmt: skip
    return cluster.pod_log(pod, container or api.trainer_container, tail_lines=tail)


def follow(
    cluster: Cluster,
    run: str,
    replica: str | None = None,
    container: str | None = None,
    say: Printer = _print,
    interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    until_done: bool = True,
) -> str:
    """Stream a container's log across restarts until the job finishes; returns the final job state.

    ``replica`` and ``container`` default to the job API's rank-0 pod and trainer container. A reconnect to
    the same container skips the lines already printed (by timestamp); a new container (restart) or a new
    pod is announced and printed from its start.
    """
    api: JobApi | None = None
    seen_id, seen_uid, last_key = None, None, ""
    while True:
        job = cluster.get_job(run, api)
        api = api_of(job) if job else api or api_of_replica(replica or "") or PYTORCHJOB
        check_replica(api, replica)
        state = api.state(job) if job else "Gone"
        name = container or api.trainer_container
        # A PyTorchJob's pod keeps its name when the operator recreates it; a TrainJob's new pod has a new one.
        pod = api.pod_of(run, replica or api.primary_replica, lambda a=api: cluster.job_pods(run, a))
        obj = cluster.get_pod(pod) if pod else None
        cs = next((c for c in _container_statuses(obj) if c["name"] == name), None) if obj else None
        started = cs is not None and (cs.get("containerID") or "") != ""
        if started:
            cid, uid = cs["containerID"], obj["metadata"].get("uid")
            if seen_id is not None and cid != seen_id and uid != seen_uid:
                # restartPolicy ExitCode (the chart's default): the operator deletes the failed pod and
                # creates a new one under the same name, so its restart count is 0 again.
                say(f"--- {pod} was recreated by the operator (a new pod); following its {name} container")
                last_key = ""
            elif seen_id is not None and cid != seen_id:
                say(
                    f"--- {pod}/{name} restarted (restart {cs.get('restartCount', '?')}); following the new container"
                )
                last_key = ""
            seen_id, seen_uid = cid, uid
            since = _since_seconds(last_key)
            for line in cluster.stream_log(pod, name, since_seconds=since):
                ts, _, text = line.partition(" ")
                key = _ts_key(ts)
                if key <= last_key:
                    continue
                last_key = key
                say(text)
        if state in FINAL or state == "Gone" or not until_done:
            return state
        sleep(interval)


def _since_seconds(last_key: str) -> int | None:
    """Ask only for the recent past on a reconnect (with a margin for clock skew); None: everything."""
    if not last_key:
        return None
    try:
        last = datetime.fromisoformat(last_key[:19]).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return max(1, int((datetime.now(timezone.utc) - last).total_seconds()) + 60)


# ----------------------------------------------------------------------------- status, list


def status(cluster: Cluster, run: str) -> dict[str, Any]:
    job = cluster.get_job(run)
    if job is None:
        raise ClusterError(
            f"PyTorchJob/{run}",
            f"not found in namespace {cluster.namespace}",
            hint="`launcher list` shows runs",
        )
    api = api_of(job)
    pods = []
    for pod in sorted(cluster.job_pods(run, api), key=lambda p: p["metadata"]["name"]):
        containers = {cs["name"]: _container_state(cs) for cs in _container_statuses(pod)}
        restarts = sum(cs.get("restartCount", 0) for cs in _container_statuses(pod))
        pods.append({"name": pod["metadata"]["name"], "phase": (pod.get("status") or {}).get("phase"),
                     "containers": containers, "restarts": restarts})  # fmt: skip
    st = job.get("status") or {}
    return {
        "name": run,
        "namespace": cluster.namespace,
        "kind": api.kind,
        "state": api.state(job),
        "config": job["metadata"].get("labels", {}).get("userloop.dev/config"),
        "created": job["metadata"].get("creationTimestamp"),
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
            for c in st.get("conditions") or []
        ],
        "replicas": api.replica_statuses(job),
        "pods": pods,
        "last_metrics": last_metrics_line(cluster, run, api),
    }


def _container_state(cs: dict[str, Any]) -> str:
    state = cs.get("state") or {}
    if "running" in state:
        return "running" if cs.get("ready", True) else "running (not ready)"
    if "terminated" in state:
        t = state["terminated"] or {}
        return f"terminated ({t.get('reason', '')}, exit {t.get('exitCode')})"
    if "waiting" in state:
        return f"waiting ({(state['waiting'] or {}).get('reason', '')})"
    return "unknown"


def last_metrics_line(cluster: Cluster, run: str, api: JobApi = PYTORCHJOB) -> str | None:
    """The trainer's newest ``step N/M ...`` line from the rank-0 pod's log (None before the first step)."""
    try:
        pod = api.pod_of(run, api.primary_replica, lambda: cluster.job_pods(run, api))
        log = cluster.pod_log(pod, api.trainer_container, tail_lines=200) if pod else ""
    except ClusterError:
        return None
    steps = [line for line in log.splitlines() if _STEP_LINE.match(line)]
    return steps[-1] if steps else None


def list_runs(cluster: Cluster) -> list[dict[str, Any]]:
    """Runs of every job API the cluster serves (and this account may list)."""
    rows = []
    for job in cluster.list_jobs(LIST_SELECTOR):
        meta, api = job["metadata"], api_of(job)
        rows.append({
            "name": meta["name"],
            "config": (meta.get("labels") or {}).get("userloop.dev/config"),
            "state": api.state(job),
            "nodes": api.nodes(job),
            "created": meta.get("creationTimestamp"),
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)


def delete(cluster: Cluster, run: str) -> bool:
    """Delete the job (pods and owned ConfigMap follow); the ConfigMap too in case it was never owned, and
    a TrainJob's ClusterTrainingRuntime, which nothing namespaced can own (only if it is this namespace's)."""
    job = cluster.get_job(run)
    api = api_of(job) if job else PYTORCHJOB
    found = cluster.delete(api.kind, run)
    cluster.delete("ConfigMap", f"{run}-config")
    if job is not None and api.runtime is not None:
        runtime = cluster.get(api.runtime.kind, run)
        if ((runtime or {}).get("metadata", {}).get("labels") or {}).get(
            "userloop.dev/namespace"
        ) == cluster.namespace:
            cluster.delete(api.runtime.kind, run)
    return found
