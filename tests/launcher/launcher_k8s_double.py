"""A small local HTTP test double for what the real API server of these tests cannot give: running pods
and their logs (there is no kubelet).

Everything else (admission, dry run, conflicts, pruning, RBAC, status subresources, field selectors,
doctor's reads) is tested against the real kube-apiserver (test_launcher_kube_apiserver.py); this
double only stores the objects ``submit`` sends, without validating them (a validation written by us
would only agree with our own offline checks), so that the log tests have a job to follow.

Where it imitates the cluster, it follows the real rules:

- pods are namespaced; a job's pods are found by the operator's ``training.kubeflow.org/job-name`` label;
- under the chart's ``restartPolicy: ExitCode`` the training-operator deletes a failed pod and creates a
  new one under the same name (``recreate_pod``): a new uid, new containers with ``restartCount`` 0,
  and the earlier logs gone; only ``OnFailure``/``Always`` restart a container in place (a new
  ``Generation``: ``restartCount`` + 1, the previous log kept for ``previous=true``);
- logs as the kubelet serves them: ``tailLines``, ``sinceSeconds`` (relative to now), ``timestamps``,
  ``previous`` (400 when there is no previous container), ``follow`` as a chunked stream that ends when
  the container does (or is cut once with ``drop_after``); an unknown container is a 400;
- ``PATCH`` by content type: strategic merge (core kinds only, ``ownerReferences`` merged by uid),
  JSON merge patch, JSON patch; anything else 415;
- ``job_script[name]``: a list of condition lists; each GET of the job moves one step (stays on the last).

Only what the launcher calls is implemented; anything else answers 404.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

CORE_PLURALS = {"configmaps": "ConfigMap", "serviceaccounts": "ServiceAccount", "persistentvolumeclaims": "PersistentVolumeClaim"}  # fmt: skip
STRATEGIC, MERGE, JSON_PATCH = (
    "application/strategic-merge-patch+json",
    "application/merge-patch+json",
    "application/json-patch+json",
)


def rfc3339(t: datetime, nanos: int = 0) -> str:
    """RFC 3339 with nanoseconds trimmed of trailing zeros, like the kubelet's timestamps."""
    frac = f"{nanos:09d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _parse(ts: str) -> datetime:
    return datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


@dataclass
class Generation:
    """One run of a container; a restart in place (OnFailure, Always, a native sidecar) starts a new one."""

    lines: list[str]
    exit_code: int | None = None  # None: still running when its log ends
    reason: str = "Completed"
    drop_after: int | None = None  # cut the first follow stream after this many lines
    age_s: float = 30.0  # the first line was written this long ago
    container_id: str = field(default_factory=lambda: f"containerd://{uuid.uuid4().hex}")
    stamps: list[str] = field(default_factory=list)
    streamed_once: bool = False

    def __post_init__(self) -> None:
        base = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=self.age_s)
        # Distinct, increasing timestamps, some with trailing-zero nanoseconds trimmed.
        self.stamps = [
            rfc3339(base + timedelta(seconds=i), nanos=(i * 100_000_000) % 1_000_000_000)
            for i in range(len(self.lines))
        ]


@dataclass
class FakePod:
    name: str
    job: str
    replica: str
    namespace: str = "userloop"
    phase: str = "Running"
    containers: dict[str, list[Generation]] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    on_stream_end: dict[str, Any] = field(
        default_factory=dict
    )  # container -> callable run when a stream ends


class K8sDouble:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], FakePod] = {}  # (namespace, name)
        self.job_script: dict[str, list[list[dict[str, Any]]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for it, once per test.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> K8sDouble:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester", "namespace": namespace}}],
        }))  # fmt: skip
        return path

    # ------------------------------------------------------------------ scripting helpers

    def add_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", rfc3339(datetime.now(timezone.utc)))
        meta.setdefault("resourceVersion", "1")
        with self.lock:
            self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj

    def add_pod(self, job: str, replica: str = "master-0", **kwargs: Any) -> FakePod:
        pod = FakePod(name=f"{job}-{replica}", job=job, replica=replica, **kwargs)
        with self.lock:
            self.pods[(pod.namespace, pod.name)] = pod
        return pod

    def recreate_pod(self, pod: FakePod, containers: dict[str, list[Generation]]) -> FakePod:
        """The operator's restart under ExitCode: the pod is deleted and created again under its name."""
        with self.lock:
            del self.pods[(pod.namespace, pod.name)]
            return self.add_pod(pod.job, pod.replica, namespace=pod.namespace, containers=containers)

    def created(self, kind: str) -> list[dict[str, Any]]:
        return [o for (k, _, _), o in self.objects.items() if k == kind]

    def calls(self, method: str | None = None) -> list[str]:
        return [
            f"{m} {p}" + (" dry-run" if q.get("dryRun") else "")
            for m, p, q in self.requests
            if method in (None, m)
        ]

    # ------------------------------------------------------------------ object views

    def job_view(self, ns: str, name: str) -> dict[str, Any] | None:
        job = self.objects.get(("PyTorchJob", ns, name))
        if job is None:
            return None
        script = self.job_script.get(name)
        if script:
            conditions = script.pop(0) if len(script) > 1 else script[0]
            job["status"] = {"conditions": conditions, "replicaStatuses": {"Master": {"active": 1}}}
        return job

    def pod_view(self, pod: FakePod) -> dict[str, Any]:
        statuses = []
        started = rfc3339(datetime.now(timezone.utc))
        for cname, gens in pod.containers.items():
            cur = gens[-1]
            if cur.exit_code is None:
                state: dict[str, Any] = {"running": {"startedAt": started}}
            else:
                state = {"terminated": {"exitCode": cur.exit_code, "reason": cur.reason, "startedAt": started,
                                        "finishedAt": started, "containerID": cur.container_id}}  # fmt: skip
            status = {"name": cname, "image": "ghcr.io/userloop/trainer:0.1.0", "imageID": "", "ready": "running" in state,
                      "restartCount": len(gens) - 1, "started": "running" in state, "state": state,
                      "containerID": cur.container_id}  # fmt: skip
            if len(gens) > 1:
                prev = gens[-2]
                status["lastState"] = {"terminated": {"exitCode": prev.exit_code or 0, "reason": prev.reason,
                                                      "containerID": prev.container_id}}  # fmt: skip
            statuses.append(status)
        rtype, _, index = pod.replica.partition("-")
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                "labels": {"training.kubeflow.org/job-name": pod.job, "training.kubeflow.org/replica-type": rtype,
                           "training.kubeflow.org/replica-index": index},
            },
            "spec": {"restartPolicy": "Never", "containers": [{"name": c, "image": "ghcr.io/userloop/trainer:0.1.0"} for c in pod.containers]},
            "status": {"phase": pod.phase, "containerStatuses": statuses},
        }  # fmt: skip


# ----------------------------------------------------------------------------- HTTP


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, null deletes, everything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return patch
    target = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge_patch(target.get(k), v)
    return target


def _strategic_merge(target: Any, patch: Any) -> Any:
    """A merge patch, except that lists with a merge key (of the few the launcher patches) merge by it."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return _merge_patch(target, patch)
    out = dict(target)
    for k, v in patch.items():
        if k == "ownerReferences" and isinstance(v, list):  # patchStrategy merge, patchMergeKey uid
            kept = {r.get("uid"): r for r in out.get(k) or []}
            kept.update({r.get("uid"): r for r in v})
            out[k] = list(kept.values())
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = _strategic_merge(out.get(k), v)
    return out


def _json_patch(target: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/replace/remove on object paths (enough for metadata patches)."""
    target = copy.deepcopy(target)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = target
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
    return target


def _flag(q: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter; the Python client sends ``True``, which the API server (ParseBool) accepts."""
    return (q.get(name) or ["false"])[0].lower() in ("true", "1")


def _selector_matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if eq and labels.get(key) != value:
            return False
        if not eq and key not in labels:
            return False
    return True


def _handler(double: K8sDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms a call.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        # -------------------------------------------------------------- plumbing

        def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, reason: str, message: str) -> None:
            self._send(code, _status(code, reason, message))

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"null")

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            with double.lock:
                double.requests.append((method, url.path, query))
            with contextlib.suppress(BrokenPipeError):  # the client went away mid-answer
                self._dispatch(method, url.path, query)

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PATCH(self) -> None:
            self._route("PATCH")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        # -------------------------------------------------------------- routes

        def _dispatch(self, method: str, path: str, q: dict[str, list[str]]) -> None:
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
            if m and method == "GET":
                return self._log(m.group(1), m.group(2), q)
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?", path)
            if m and method == "GET":
                return self._pods(m.group(1), m.group(2), q)
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?", path)
            if m and m.group(2) in CORE_PLURALS:
                return self._object(method, CORE_PLURALS[m.group(2)], m.group(1), m.group(3), q)
            m = re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?", path)
            if m:
                return self._object(method, "PyTorchJob", m.group(1), m.group(2), q)
            self._error(404, "NotFound", f"the double does not serve {method} {path}")

        def _object(self, method: str, kind: str, ns: str, name: str | None, q: dict[str, list[str]]) -> None:
            key = (kind, ns, name or "")
            with double.lock:
                if method == "POST" and name is None:
                    return self._create(kind, ns, q)
                obj = double.job_view(ns, name or "") if kind == "PyTorchJob" else double.objects.get(key)
                if obj is None or name is None:
                    return self._error(404, "NotFound", f'{kind.lower()}s "{name}" not found')
                if method == "GET":
                    return self._send(200, obj)
                if method == "PATCH":
                    return self._patch(kind, key, obj)
                if method == "DELETE":
                    # No garbage collector here (nor on the real test server): owned objects stay.
                    del double.objects[key]
                    return self._send(200, _status(200, "", "deleted") | {"status": "Success"})
            self._error(405, "MethodNotAllowed", method)

        def _patch(self, kind: str, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            body = self._body()
            if ctype == STRATEGIC and kind == "PyTorchJob":
                # The API server's answer for custom resources (no Go struct to take merge keys from).
                return self._error(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: {JSON_PATCH}, {MERGE}")  # fmt: skip
            if ctype == STRATEGIC:
                patched = _strategic_merge(obj, body)
            elif ctype == MERGE:
                patched = _merge_patch(obj, body)
            elif ctype == JSON_PATCH and isinstance(body, list):
                patched = _json_patch(obj, body)
            elif ctype == JSON_PATCH:
                return self._error(
                    400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            else:
                return self._error(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
            double.objects[key] = patched
            self._send(200, patched)

        def _create(self, kind: str, ns: str, q: dict[str, list[str]]) -> None:
            obj = self._body()
            if obj.get("kind") != kind:
                return self._error(400, "BadRequest", f"kind {obj.get('kind')} sent to the {kind} endpoint")
            name = obj["metadata"]["name"]
            if (kind, ns, name) in double.objects:
                return self._error(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
            obj["metadata"]["namespace"] = ns
            if q.get("dryRun") == ["All"]:
                return self._send(201, obj)
            self._send(201, double.add_object(obj))

        def _pods(self, ns: str, name: str | None, q: dict[str, list[str]]) -> None:
            with double.lock:
                if name is None:
                    sel = (q.get("labelSelector") or [""])[0]
                    items = [double.pod_view(p) for (pns, _), p in double.pods.items() if pns == ns]
                    items = [p for p in items if _selector_matches(p["metadata"]["labels"], sel)]
                    return self._send(
                        200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
                    )
                pod = double.pods.get((ns, name))
                if pod is None:
                    return self._error(404, "NotFound", f'pods "{name}" not found')
                self._send(200, double.pod_view(pod))

        def _log(self, ns: str, name: str, q: dict[str, list[str]]) -> None:
            pod = double.pods.get((ns, name))
            if pod is None:
                return self._error(404, "NotFound", f'pods "{name}" not found')
            container = (q.get("container") or [""])[0]
            if container not in pod.containers:
                return self._error(400, "BadRequest", f"container {container} is not valid for pod {name}")
            gens = pod.containers[container]
            if _flag(q, "previous"):
                if len(gens) < 2:
                    return self._error(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found')  # fmt: skip
                gen = gens[-2]
            else:
                gen = gens[-1]
            pairs = list(zip(gen.stamps, gen.lines, strict=True))
            since = (q.get("sinceSeconds") or [None])[0]
            if since is not None:
                cutoff = datetime.now(timezone.utc) - timedelta(seconds=int(since))
                pairs = [(ts, text) for ts, text in pairs if _parse(ts) >= cutoff.replace(microsecond=0)]
            stamped = _flag(q, "timestamps")
            lines = [f"{ts} {text}" if stamped else text for ts, text in pairs]
            if not _flag(q, "follow"):
                tail = int((q.get("tailLines") or ["0"])[0]) or len(lines)
                return self._send(200, "".join(line + "\n" for line in lines[-tail:]), "text/plain")
            # A follow stream: chunked, like the kubelet's; cut short once if drop_after is set.
            cut = gen.drop_after if not gen.streamed_once else None
            gen.streamed_once = True
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, line in enumerate(lines):
                if cut is not None and i == cut:
                    self.close_connection = True  # drop mid-stream: no terminating chunk, socket closed
                    return
                data = (line + "\n").encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                time.sleep(0.001)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            hook = pod.on_stream_end.get(container)
            if hook:
                with double.lock:
                    hook()

    return Handler
