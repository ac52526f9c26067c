"""A small local HTTP test double of the Kubernetes REST endpoints the launcher uses.

No API server can run here, so ``launcher.cluster`` (the real ``kubernetes`` client) talks to this
instead, over HTTP on 127.0.0.1. It keeps objects in memory, validates what it is sent against the
real schemas (Kubernetes 1.33 strict + the PyTorchJob CRD, through ``launcher.checks``) the way
``fieldValidation=Strict`` would, honours ``dryRun=All``, and plays scripted job / pod timelines:

- ``job_script[name]``: a list of condition lists; each GET of the job moves one step (stays on the last);
- ``add_pod(...)`` with container *generations* (restarts), each with timestamped log lines, an
  optional ``drop_after`` (the first log stream is cut after N lines) and a final state;
- every object it returns validates against the same schemas (tests assert it).

Only what the launcher calls is implemented; anything else answers 404.
"""

from __future__ import annotations

import contextlib
import copy
import functools
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

from launcher import checks

CORE_PLURALS = {
    "configmaps": "ConfigMap",
    "serviceaccounts": "ServiceAccount",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "secrets": "Secret",
    "pods": "Pod",
}
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def rfc3339(t: datetime, nanos: int = 0) -> str:
    """RFC 3339 with nanoseconds trimmed of trailing zeros, like the kubelet's timestamps."""
    frac = f"{nanos:09d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass
class Generation:
    """One run of a container (a restart starts a new generation)."""

    lines: list[str]
    exit_code: int | None = None  # None: still running when its log ends
    reason: str = "Completed"
    drop_after: int | None = None  # cut the first follow stream after this many lines
    container_id: str = field(default_factory=lambda: f"containerd://{uuid.uuid4().hex}")
    stamps: list[str] = field(default_factory=list)
    streamed_once: bool = False

    def __post_init__(self) -> None:
        base = T0 + timedelta(seconds=len(self.container_id) % 7)
        # Distinct, increasing timestamps; some with trailing-zero nanoseconds trimmed.
        self.stamps = [
            rfc3339(base + timedelta(seconds=i), nanos=(i * 100_000_000) % 1_000_000_000)
            for i in range(len(self.lines))
        ]


@dataclass
class FakePod:
    name: str
    job: str
    replica: str
    phase: str = "Running"
    containers: dict[str, list[Generation]] = field(default_factory=dict)
    waiting_reason: str | None = None  # e.g. CreateContainerConfigError, for the `pytorch` container
    events: list[dict[str, Any]] = field(default_factory=list)
    on_stream_end: dict[str, Any] = field(
        default_factory=dict
    )  # container -> callable run when a stream ends


@functools.lru_cache(maxsize=1)
def _crd_json() -> str:
    # Parsed once per session; each double gets its own copy (a test may edit it).
    return json.dumps(yaml.load(checks.CRD_PATH.read_text(), Loader=checks._Loader))


class K8sDouble:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.pods: dict[str, FakePod] = {}
        self.job_script: dict[str, list[list[dict[str, Any]]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.namespaces = {"default", "userloop"}
        self.nodes: list[dict[str, Any]] = []
        self.crd: dict[str, Any] | None = json.loads(_crd_json())
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
        meta.setdefault("creationTimestamp", rfc3339(T0))
        meta.setdefault("resourceVersion", "1")
        with self.lock:
            self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj

    def add_pod(self, job: str, replica: str = "master-0", **kwargs: Any) -> FakePod:
        pod = FakePod(name=f"{job}-{replica}", job=job, replica=replica, **kwargs)
        with self.lock:
            self.pods[pod.name] = pod
        return pod

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

    def pod_view(self, pod: FakePod, ns: str) -> dict[str, Any]:
        statuses = []
        for cname, gens in pod.containers.items():
            cur = gens[-1]
            if pod.waiting_reason and cname == "pytorch":
                state: dict[str, Any] = {"waiting": {"reason": pod.waiting_reason, "message": "see events"}}
                cid = None
            elif cur.exit_code is None:
                state = {"running": {"startedAt": rfc3339(T0)}}
                cid = cur.container_id
            else:
                state = {"terminated": {"exitCode": cur.exit_code, "reason": cur.reason, "startedAt": rfc3339(T0),
                                        "finishedAt": rfc3339(T0 + timedelta(minutes=1)), "containerID": cur.container_id}}  # fmt: skip
                cid = cur.container_id
            status = {"name": cname, "image": "ghcr.io/userloop/trainer:0.1.0", "imageID": "", "ready": "running" in state,
                      "restartCount": len(gens) - 1, "started": "running" in state, "state": state}  # fmt: skip
            if cid:
                status["containerID"] = cid
            if len(gens) > 1:
                prev = gens[-2]
                status["lastState"] = {"terminated": {"exitCode": prev.exit_code or 0, "reason": prev.reason,
                                                      "containerID": prev.container_id}}  # fmt: skip
            statuses.append(status)
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name, "namespace": ns, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, pod.name)),
                "creationTimestamp": rfc3339(T0),
                "labels": {"training.kubeflow.org/job-name": pod.job,
                           "training.kubeflow.org/replica-type": pod.replica.split("-")[0],
                           "training.kubeflow.org/replica-index": pod.replica.split("-")[1]},
            },
            "spec": {"containers": [{"name": c, "image": "ghcr.io/userloop/trainer:0.1.0"} for c in pod.containers]},
            "status": {"phase": pod.phase, "containerStatuses": statuses},
        }  # fmt: skip

    def event_view(self, pod: FakePod, ns: str, i: int, event: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{pod.name}.{i}", "namespace": ns},
            "involvedObject": {"kind": "Pod", "name": pod.name, "namespace": ns},
            "type": "Warning", "count": 1, **event,
        }  # fmt: skip


# ----------------------------------------------------------------------------- HTTP


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    target = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge_patch(target.get(k), v)
    return target


def _validate(obj: dict[str, Any]) -> list[str]:
    if obj.get("kind") == "PyTorchJob":
        return checks.crd_problems(obj) + checks.schema_problems([obj], "1.33")
    return checks.schema_problems([obj], "1.33")


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
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/events", path)
            if m and method == "GET":
                return self._events(m.group(1), q)
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)", path)
            if m and method == "GET":
                if m.group(1) in double.namespaces:
                    return self._send(
                        200, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": m.group(1)}}
                    )
                return self._send(404, _status(404, "NotFound", f'namespaces "{m.group(1)}" not found'))
            if path == "/api/v1/nodes" and method == "GET":
                sel = (q.get("labelSelector") or [""])[0]
                items = [n for n in double.nodes if _selector_matches(n["metadata"].get("labels", {}), sel)]
                return self._send(
                    200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items}
                )
            if path == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org":
                if double.crd is None:
                    return self._send(404, _status(404, "NotFound", "not found"))
                return self._send(200, double.crd)
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?", path)
            if m and m.group(2) in CORE_PLURALS:
                return self._object(method, CORE_PLURALS[m.group(2)], m.group(1), m.group(3), q)
            m = re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?", path)
            if m:
                return self._object(method, "PyTorchJob", m.group(1), m.group(2), q)
            self._send(404, _status(404, "NotFound", f"the double does not serve {method} {path}"))

        def _object(self, method: str, kind: str, ns: str, name: str | None, q: dict[str, list[str]]) -> None:
            key = (kind, ns, name or "")
            with double.lock:
                if kind == "Pod":
                    return self._pods(ns, name, q)
                if method == "POST":
                    return self._create(kind, ns, q)
                if method == "GET" and name is None:
                    sel = (q.get("labelSelector") or [""])[0]
                    items = [o for (k, n, _), o in double.objects.items() if k == kind and n == ns
                             and _selector_matches(o["metadata"].get("labels", {}), sel)]  # fmt: skip
                    items = [
                        double.job_view(ns, o["metadata"]["name"]) if kind == "PyTorchJob" else o
                        for o in items
                    ]
                    return self._send(
                        200, {"apiVersion": "v1", "kind": f"{kind}List", "metadata": {}, "items": items}
                    )
                obj = double.job_view(ns, name or "") if kind == "PyTorchJob" else double.objects.get(key)
                if obj is None:
                    return self._send(404, _status(404, "NotFound", f'{kind.lower()}s "{name}" not found'))
                if method == "GET":
                    return self._send(200, obj)
                if method == "PATCH":
                    patched = _merge_patch(obj, self._body())
                    double.objects[key] = patched
                    return self._send(200, patched)
                if method == "DELETE":
                    del double.objects[key]
                    if kind == "PyTorchJob":  # the garbage collector's part: owned objects go too
                        uid = obj["metadata"]["uid"]
                        for k, o in list(double.objects.items()):
                            if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])):
                                del double.objects[k]
                    return self._send(200, _status(200, "", "deleted") | {"status": "Success"})
            self._send(405, _status(405, "MethodNotAllowed", method))

        def _create(self, kind: str, ns: str, q: dict[str, list[str]]) -> None:
            obj = self._body()
            if obj.get("kind") != kind:
                return self._send(
                    400, _status(400, "BadRequest", f"kind {obj.get('kind')} sent to the {kind} endpoint")
                )
            if q.get("fieldValidation") == ["Strict"]:
                problems = _validate(obj)
                if problems:
                    unknown = [p for p in problems if "Additional properties" in p]
                    code, reason = (400, "BadRequest") if unknown else (422, "Invalid")
                    message = ("strict decoding error: " if unknown else "") + "; ".join(problems)
                    return self._send(code, _status(code, reason, message))
            name = obj["metadata"]["name"]
            if (kind, ns, name) in double.objects:
                return self._send(
                    409, _status(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
                )
            obj["metadata"]["namespace"] = ns
            if q.get("dryRun") == ["All"]:
                return self._send(201, obj)
            self._send(201, double.add_object(obj))

        def _pods(self, ns: str, name: str | None, q: dict[str, list[str]]) -> None:
            if name is None:
                sel = (q.get("labelSelector") or [""])[0]
                items = [double.pod_view(p, ns) for p in double.pods.values()]
                items = [p for p in items if _selector_matches(p["metadata"]["labels"], sel)]
                return self._send(
                    200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
                )
            pod = double.pods.get(name)
            if pod is None:
                return self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
            self._send(200, double.pod_view(pod, ns))

        def _events(self, ns: str, q: dict[str, list[str]]) -> None:
            sel = dict(t.split("=", 1) for t in (q.get("fieldSelector") or [""])[0].split(",") if "=" in t)
            items = []
            for pod in double.pods.values():
                if sel.get("involvedObject.name") in (None, pod.name):
                    items += [double.event_view(pod, ns, i, e) for i, e in enumerate(pod.events)]
            self._send(200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items})

        def _log(self, ns: str, name: str, q: dict[str, list[str]]) -> None:
            pod = double.pods.get(name)
            container = (q.get("container") or ["pytorch"])[0]
            if pod is None or container not in pod.containers:
                return self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
            gens = pod.containers[container]
            gen = gens[-2] if _flag(q, "previous") and len(gens) > 1 else gens[-1]
            stamped = _flag(q, "timestamps")
            lines = [
                f"{ts} {text}" if stamped else text for ts, text in zip(gen.stamps, gen.lines, strict=True)
            ]
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
