"""What ``submit``, ``--wait``, ``--follow``, ``status``, ``list`` and ``delete`` do, over a ``Cluster``.

Works on plain dicts as the API server returns them; every API call goes through ``cluster.Cluster``.
Waiting polls the job every few seconds (one GET, cheap for the server and robust to dropped
connections, unlike a watch). Output is one plain line per state change, fit for CI logs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from launcher.cluster import Cluster, ClusterError
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


def submit(cluster: Cluster, rendered: Rendered, say: Printer = _print) -> dict[str, Any]:
    """Server-side dry run of everything, then create: shared objects when missing, the ConfigMap, the
    job, and finally the ConfigMap's owner reference to the job (its uid exists only now)."""
    shared = [o for o in rendered.objects if o["kind"] in ("ServiceAccount", "PersistentVolumeClaim")]
    missing = [o for o in shared if cluster.get(o["kind"], o["metadata"]["name"]) is None]
    configmap = rendered.by_kind("ConfigMap")[0]
    to_create = [*missing, configmap, rendered.job]
    for obj in to_create:
        try:
            cluster.create(obj, dry_run=True)
        except ClusterError as e:
            raise UserError(
                f"{obj['kind']}/{obj['metadata']['name']}",
                f"the API server rejected it in a dry run (nothing was created): {'; '.join(e.problems)}",
                hint=e.hint or "`launcher render -o DIR` shows the manifests",
            ) from None
    for obj in missing:
        cluster.create(obj)
        say(f"created {obj['kind']}/{obj['metadata']['name']} (shared by all runs)")
    cluster.create(configmap)
    try:
        job = cluster.create(rendered.job)
    except ClusterError:
        cluster.delete("ConfigMap", configmap["metadata"]["name"])  # no job will ever own it
        raise
    cluster.set_owner(configmap["metadata"]["name"], job)
    return job


# ----------------------------------------------------------------------------- state


def job_state(job: dict[str, Any]) -> str:
    """Succeeded or Failed when either condition is True anywhere in the list (not only the last one),
    else the newest True condition (Created, Running, Restarting, Suspended), else Pending."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if c.get("status") == "True"]
    for final in FINAL:
        if any(c.get("type") == final for c in true):
            return final
    return true[-1]["type"] if true else "Pending"


def _condition_message(job: dict[str, Any], state: str) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == state and c.get("message"):
            return c["message"]
    return ""


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


def scheduling_report(cluster: Cluster, run: str, pods: list[dict[str, Any]]) -> list[str]:
    if not pods:
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
    message = _condition_message(job, "Failed")
    if message:
        lines.append(f"{run}: {message}")
    for pod in cluster.job_pods(run):
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
) -> int:
    """Exit code: 0 Succeeded, 1 Failed (with the reason and last log lines), 124 on timeout (with
    what keeps the pods from running)."""
    deadline = clock() + timeout
    last, reported = None, set()
    while True:
        job = cluster.get_job(run)
        if job is None:
            say(f"{run}: the PyTorchJob is gone (deleted, or removed by its TTL)")
            return EXIT_FAILED
        state = job_state(job)
        if state != last:
            say(f"{run}: {state}")
            last = state
        if state == "Succeeded":
            return 0
        if state == "Failed":
            for line in failure_report(cluster, run, job):
                say(line)
            return EXIT_FAILED
        for line in pod_problems(cluster.job_pods(run)):
            if line not in reported:
                reported.add(line)
                say(line)
        if clock() >= deadline:
            say(
                f"{run}: still {state} after {timeout:g} s; the job keeps running (`launcher delete {run}` stops it)"
            )
            for line in scheduling_report(cluster, run, cluster.job_pods(run)):
                if line not in reported:
                    say(line)
            return EXIT_TIMEOUT
        sleep(interval)


def _ts_key(ts: str) -> str:
    """RFC 3339 with nanoseconds trimmed of trailing zeros -> a fixed-width string that sorts in time order."""
    head, _, frac = ts.rstrip("Z").partition(".")
    return f"{head}.{frac:0<9}"


def follow(
    cluster: Cluster,
    run: str,
    replica: str = "master-0",
    container: str = "pytorch",
    say: Printer = _print,
    interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    until_done: bool = True,
) -> str:
    """Stream a container's log across restarts until the job finishes; returns the final job state.

    A reconnect to the same container skips the lines already printed (by timestamp); a new container
    (restart) is announced and printed from its start.
    """
    pod = f"{run}-{replica}"
    seen_id, last_key = None, ""
    while True:
        job = cluster.get_job(run)
        state = job_state(job) if job else "Gone"
        obj = cluster.get_pod(pod)
        cs = next((c for c in _container_statuses(obj) if c["name"] == container), None) if obj else None
        started = cs is not None and (cs.get("containerID") or "") != ""
        if started:
            cid = cs["containerID"]
            if seen_id is not None and cid != seen_id:
                say(
                    f"--- {pod}/{container} restarted (restart {cs.get('restartCount', '?')}); following the new container"
                )
                last_key = ""
            seen_id = cid
            since = _since_seconds(last_key)
            for line in cluster.stream_log(pod, container, since_seconds=since):
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
    pods = []
    for pod in sorted(cluster.job_pods(run), key=lambda p: p["metadata"]["name"]):
        containers = {cs["name"]: _container_state(cs) for cs in _container_statuses(pod)}
        restarts = sum(cs.get("restartCount", 0) for cs in _container_statuses(pod))
        pods.append({"name": pod["metadata"]["name"], "phase": (pod.get("status") or {}).get("phase"),
                     "containers": containers, "restarts": restarts})  # fmt: skip
    st = job.get("status") or {}
    return {
        "name": run,
        "namespace": cluster.namespace,
        "state": job_state(job),
        "config": job["metadata"].get("labels", {}).get("userloop.dev/config"),
        "created": job["metadata"].get("creationTimestamp"),
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
            for c in st.get("conditions") or []
        ],
        "replicas": st.get("replicaStatuses") or {},
        "pods": pods,
        "last_metrics": last_metrics_line(cluster, run),
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


def last_metrics_line(cluster: Cluster, run: str) -> str | None:
    """The trainer's newest ``step N/M ...`` line from the master's log (None before the first step)."""
    try:
        log = cluster.pod_log(f"{run}-master-0", "pytorch", tail_lines=200)
    except ClusterError:
        return None
    steps = [line for line in log.splitlines() if _STEP_LINE.match(line)]
    return steps[-1] if steps else None


def list_runs(cluster: Cluster) -> list[dict[str, Any]]:
    rows = []
    for job in cluster.list_jobs(LIST_SELECTOR):
        meta = job["metadata"]
        specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        rows.append({
            "name": meta["name"],
            "config": (meta.get("labels") or {}).get("userloop.dev/config"),
            "state": job_state(job),
            "nodes": sum(int(s.get("replicas", 1)) for s in specs.values()),
            "created": meta.get("creationTimestamp"),
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["created"] or "", reverse=True)


def delete(cluster: Cluster, run: str) -> bool:
    """Delete the job (pods and owned ConfigMap follow); the ConfigMap too in case it was never owned."""
    found = cluster.delete("PyTorchJob", run)
    cluster.delete("ConfigMap", f"{run}-config")
    return found
