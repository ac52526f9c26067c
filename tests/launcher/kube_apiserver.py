"""A real kube-apiserver (with etcd) on loopback, for the cluster tests that need the real server.

``KubeApiserver.start()`` runs Debian's ``etcd`` and a real ``kube-apiserver`` (v1.20.2 by default)
on free 127.0.0.1 ports in a temporary directory, with the RBAC authorizer, a static admin token and
service-account tokens signed by a key made for the session; ``stop()`` ends both processes and
removes the directory. The launcher reaches it as it reaches any cluster: a kubeconfig with a bearer
token and the server's real CA (no ``insecure-skip-tls-verify``).

Where it comes from: ``etcd`` from ``apt-get install etcd-server`` (``.ci/run`` installs it); the
binary from ``$USERLOOP_KUBE_APISERVER``, else ``../shared/tools/kube-apiserver/`` next to the
checkout (gzipped or not); ``scripts/build-kube-apiserver.sh`` builds it from Debian's sources.
``missing()`` says which is absent, so the tests skip with that reason instead of failing.

What a v1.20 server without controllers does not do (tests must play these parts): no scheduler,
kubelet, training-operator or garbage collector (owned objects stay after their owner is deleted), no
``fieldValidation=Strict`` (1.25+; unknown fields of a custom resource are pruned silently), no CEL
rules, no pod logs (there is no kubelet), no token controller (ServiceAccount token Secrets are never
created; ``TokenRequest``, what ``kubectl create token`` uses, works).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import gzip
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED_DIR = REPO.parent / "shared" / "tools" / "kube-apiserver"
ENV_VAR = "USERLOOP_KUBE_APISERVER"
ADMIN_TOKEN = "userloop-test-admin"  # a static token of a throwaway server on loopback; not a secret
START_TIMEOUT = 60.0  # seconds; it is ready in about 4 s on 2 idle cores


def apiserver_binary() -> Path | None:
    """``$USERLOOP_KUBE_APISERVER`` (a binary or its .gz), else the shared tools folder, else None."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env) if Path(env).is_file() else None
    for name in ("kube-apiserver", "kube-apiserver-v1.20.2-linux-amd64.gz"):
        if (SHARED_DIR / name).is_file():
            return SHARED_DIR / name
    return None


def missing() -> str | None:
    """Why the real server cannot start here (the skip reason), or None when it can."""
    needs = []
    if shutil.which("etcd") is None:
        needs.append("etcd (apt-get install etcd-server)")
    if shutil.which("openssl") is None:
        needs.append("openssl (apt-get install openssl)")
    if apiserver_binary() is None:
        where = os.environ.get(ENV_VAR) or str(SHARED_DIR)
        needs.append(
            f"the kube-apiserver binary (${ENV_VAR}, or {where}; scripts/build-kube-apiserver.sh builds it)"
        )
    return f"no real kube-apiserver: missing {', '.join(needs)}" if needs else None


def _free_port() -> int:
    # Free now; another process could take it before etcd or the server binds it: start() then retries.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # On a shared machine the servers must not outlive a killed pytest (Linux; best effort elsewhere).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class KubeApiserver:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="userloop-kube-"))
        self.work = self.dir  # this start attempt's folder (etcd data, keys, certificates, logs)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.work / "ca.crt"

    # ------------------------------------------------------------------ lifecycle

    def start(self, attempts: int = 2) -> KubeApiserver:
        try:
            binary = self._binary()
            for attempt in range(attempts):
                self.work = self.dir / f"try{attempt}"
                self.work.mkdir()
                try:
                    self._start(binary)
                    return self
                except RuntimeError:
                    self._stop_processes()
                    if attempt == attempts - 1:
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, binary: Path) -> None:
        etcd_port, peer_port, metrics_port, self.port = (_free_port() for _ in range(4))
        d = self.work
        self._spawn("etcd", [
            "etcd", "--data-dir", str(d / "etcd"), "--name", "t",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"t=http://127.0.0.1:{peer_port}",
            "--listen-metrics-urls", f"http://127.0.0.1:{metrics_port}",
        ])  # fmt: skip
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True, timeout=30)  # fmt: skip
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
        (d / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        self._spawn("kube-apiserver", [
            str(binary), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
            f"--cert-dir={d / 'serving'}", f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            # The ServiceAccount admission plugin waits for token Secrets that only the (absent)
            # controller manager creates; pods are created by the tests, as the operator would.
            "--disable-admission-plugins=ServiceAccount", "--enable-priority-and-fairness=false",
            "--profiling=false", "--logtostderr=true", "--v=0",
        ])  # fmt: skip
        self._wait_ready()

    def _binary(self) -> Path:
        found = apiserver_binary()
        assert found is not None, missing()
        if found.suffix != ".gz":
            return found
        target = self.dir / "kube-apiserver"
        with gzip.open(found) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        target.chmod(0o755)
        return target

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.work / f"{name}.log").open("wb")
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, preexec_fn=_die_with_parent
            )
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for proc, name in zip(self.procs, ("etcd", "kube-apiserver"), strict=False):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if self._ca_from_serving_cert():
                try:
                    if self.request("GET", "/readyz") == "ok":
                        return
                except (urllib.error.URLError, OSError, ssl.SSLError) as e:
                    last = str(e)
            time.sleep(0.2)
        raise RuntimeError(
            f"kube-apiserver not ready after {START_TIMEOUT:g} s ({last}):\n{self.log_tail('kube-apiserver')}"
        )

    def _ca_from_serving_cert(self) -> bool:
        # With --cert-dir and no certificate given, the server makes a CA and a serving certificate for
        # 127.0.0.1 signed by it, and writes both to apiserver.crt (serving first, then the CA).
        crt = self.work / "serving" / "apiserver.crt"
        if self.ca_file.is_file():
            return True
        if not crt.is_file():
            return False
        blocks = crt.read_text().split("-----END CERTIFICATE-----")
        pems = [b.strip() + "\n-----END CERTIFICATE-----\n" for b in blocks if "BEGIN CERTIFICATE" in b]
        if len(pems) < 2:
            return False
        self.ca_file.write_text(pems[-1])
        return True

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def _stop_processes(self) -> None:
        for proc in reversed(self.procs):  # the API server first: it would log etcd's absence
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()

    def stop(self) -> None:
        self._stop_processes()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ access

    def request(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN,
                content_type: str = "application/json") -> Any:  # fmt: skip
        """One call as the admin (or ``token``); JSON in and out. Raises urllib's HTTPError on >= 400."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            # Keep the server's Status message: it is what a failing test needs to show.
            e.body = e.read().decode(errors="replace")  # type: ignore[attr-defined]
            e.msg = f"{e.msg}: {e.body}"  # type: ignore[attr-defined]
            raise
        with contextlib.suppress(ValueError):
            return json.loads(text)
        return text

    def kubeconfig(self, path: Path, token: str = ADMIN_TOKEN, namespace: str = "default") -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "real",
            "clusters": [{"name": "real", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": "u", "namespace": namespace}}],
        }))  # fmt: skip
        return path

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API, as `kubectl create token` gets one."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds}}  # fmt: skip
        out = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
        return out["status"]["token"]


_PATHS = {
    "Namespace": "/api/v1/namespaces",
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "PersistentVolumeClaim": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "PyTorchJob": "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs",
    "PriorityClass": "/apis/scheduling.k8s.io/v1/priorityclasses",
}


def collection(kind: str, namespace: str = "default") -> str:
    """The REST path of a kind's collection (the kinds the tests create as the admin)."""
    return _PATHS[kind].format(ns=namespace)


def wait_established(server: KubeApiserver, timeout: float = 20.0) -> None:
    """A CRD serves its resource only once Established (about 0.7 s after create or update)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = server.request("GET", collection("CustomResourceDefinition") + "/pytorchjobs.kubeflow.org")
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise TimeoutError("the PyTorchJob CRD was not Established in time")
