"""The only module that talks to the Kubernetes API server (with the official ``kubernetes`` client).

``Cluster`` wraps the few REST calls the launcher makes: create (with server-side dry run and strict
field validation), get, list, patch and delete of our objects, pod logs (streamed), events, and the
reads ``launcher doctor`` needs. Everything above it (``runs.py``, ``doctor.py``) works on plain dicts
and never imports ``kubernetes``. ``render`` and ``submit --dry-run`` never construct a ``Cluster``.

The client is imported inside ``Cluster.__init__``: it costs ~0.8 s, which ``launcher --help`` and
``launcher render`` must not pay.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from launcher.job_apis import CUSTOM_RESOURCES, JOB_APIS, PYTORCHJOB, JobApi, Resource
from trainer.errors import EXIT_FAILED, UserError

JOB_GROUP, JOB_VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_CRD = PYTORCHJOB.resource.crd
# Labels the training-operator puts on a job's pods.
JOB_NAME_LABEL = PYTORCHJOB.pod_label
_LOG_HINT = "`launcher status NAME` lists the run's pods and containers (e.g. --replica worker-0, -c sglang)"
REQUEST_TIMEOUT = (10, 60)  # connect, read (seconds)
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(UserError):
    """The API server refused or could not be reached; not a usage error."""

    exit_code = EXIT_FAILED

    def __init__(
        self, source: str, problems: list[str] | str, hint: str | None = None, status: int | None = None
    ):
        super().__init__(source, problems, hint=hint)
        self.status = status  # the HTTP status of a refusal (409: the name is taken); None: no answer


class ClusterUnreachable(ClusterError):
    """No answer from the API server at all (refused, timed out, TLS): nothing else is worth trying, so
    callers that turn a ``ClusterError`` into something milder (doctor's "?" lines) let this one through."""


class Cluster:
    """A connection to one cluster and namespace.

    ``kubeconfig``/``context`` select a kubeconfig entry; without a kubeconfig file and inside a pod
    the in-cluster service account is used. ``namespace`` defaults to the context's namespace.
    """

    def __init__(
        self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
    ):
        from kubernetes import client, config

        self._client = client
        configuration = client.Configuration()
        # urllib3's default (3 retries of everything) multiplies each timeout by 4 against a dead server. One
        # more connection attempt is harmless (nothing was sent yet); a read is never repeated: a POST may have
        # landed, and a server that let a GET time out once will most likely do it again.
        configuration.retries = _retries()
        path = (
            kubeconfig
            or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
            or str(Path.home() / ".kube/config")
        )
        context_namespace = None
        if Path(path).is_file():
            try:
                config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
                contexts, active = config.list_kube_config_contexts(config_file=path)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                context_namespace = (chosen or {}).get("context", {}).get("namespace")
                self.origin = f"kubeconfig {path}, context {(chosen or {}).get('name', context)}"
            except config.ConfigException as e:
                raise UserError(
                    path, f"unusable kubeconfig: {e}", hint="check --kubeconfig and --context"
                ) from None
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            self.origin = "the pod's service account"
            if _SA_NAMESPACE.is_file():
                context_namespace = _SA_NAMESPACE.read_text().strip()
        else:
            raise UserError(
                "kubeconfig",
                f"no cluster configured: {path} does not exist and this is not a pod",
                hint="pass --kubeconfig PATH or set KUBECONFIG; `launcher submit --dry-run` needs no cluster",
            )
        self.host = configuration.host
        self.namespace = namespace or context_namespace or "default"
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.apiext = client.ApiextensionsV1Api(self.api)
        self.scheduling = client.SchedulingV1Api(self.api)

    # ------------------------------------------------------------------ error translation

    def _call(
        self,
        what: str,
        fn: Any,
        *args: Any,
        hint: str | None = None,
        statuses: Mapping[int, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` with every failure turned into a ``ClusterError``: every request goes through
        here. ``statuses`` maps HTTP statuses that are answers, not errors, to the value to return (404 -> None)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        # A dead API server must not hang the launcher; log streams wait as long as the container runs (but
        # still give up connecting after the connect timeout).
        timeout = (REQUEST_TIMEOUT[0], None) if kwargs.get("follow") else REQUEST_TIMEOUT
        kwargs.setdefault("_request_timeout", timeout)
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if statuses and e.status in statuses:
                return statuses[e.status]
            raise ClusterError(
                what, _api_message(e), hint=hint or _api_hint(e.status), status=e.status
            ) from None
        except HTTPError as e:
            raise self.unreachable(what, e) from None

    def unreachable(self, what: str, err: Exception) -> ClusterUnreachable:
        """The error for a request that got no HTTP answer: the server's URL, the cause, where the URL came from."""
        from urllib3.exceptions import SSLError

        cause = _cause(getattr(err, "reason", None) or err)
        tls = isinstance(getattr(err, "reason", None) or err, SSLError)
        check = (
            "check the certificate-authority (or insecure-skip-tls-verify) of the cluster entry"
            if tls
            else "check that the cluster is up and this is the right server"
        )
        return ClusterUnreachable(
            what,
            f"cannot reach the API server {self.host}: {cause}",
            hint=f"the URL comes from {self.origin}: {check}; `kubectl cluster-info` tries the same server, "
            "and --context (or --kubeconfig) picks another",
        )

    def _missing_ok(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn``'s result as a dict, or None on 404."""
        result = self._call(what, fn, *args, statuses={404: None}, **kwargs)
        return None if result is None else self._plain(result)

    def _plain(self, result: Any) -> Any:
        return result if isinstance(result, dict) else self.api.sanitize_for_serialization(result)

    # ------------------------------------------------------------------ our objects

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Create ``obj`` with strict field validation (the server rejects unknown fields instead of
        dropping them); ``dry_run`` runs admission and validation without persisting anything."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        opts: dict[str, Any] = {"field_validation": "Strict"}
        if dry_run:
            opts["dry_run"] = "All"
        what = f"{'dry-run ' if dry_run else ''}create {kind}/{name}"
        ns = obj["metadata"].get("namespace", self.namespace)
        custom = CUSTOM_RESOURCES.get(kind)
        if custom is not None:
            fn, args = self._custom_fn("create", custom, ns)
            return self._plain(self._call(what, fn, *args, obj, **opts))
        fn = getattr(self.core, f"create_namespaced_{_snake(kind)}")
        return self._plain(self._call(what, fn, ns, obj, **opts))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        custom = CUSTOM_RESOURCES.get(kind)
        if custom is not None:
            fn, args = self._custom_fn("get", custom, self.namespace)
            return self._missing_ok(f"get {kind}/{name}", fn, *args, name)
        fn = getattr(self.core, f"read_namespaced_{_snake(kind)}")
        return self._missing_ok(f"get {kind}/{name}", fn, name, self.namespace)

    def delete(self, kind: str, name: str) -> bool:
        """Delete in the background (pods and owned ConfigMap go with the job); False when already gone."""
        what = f"delete {kind}/{name}"
        custom = CUSTOM_RESOURCES.get(kind)
        if custom is not None:
            fn, args = self._custom_fn("delete", custom, self.namespace)
            done = self._call(what, fn, *args, name, propagation_policy="Background", statuses={404: False})
        else:
            fn = getattr(self.core, f"delete_namespaced_{_snake(kind)}")
            done = self._call(what, fn, name, self.namespace, statuses={404: False})
        return done is not False

    def set_owner(self, configmap: str, job: dict[str, Any]) -> None:
        """Make the job own the ConfigMap, so deleting the job (or its TTL) deletes it too."""
        owner = {
            "apiVersion": job["apiVersion"],
            "kind": job["kind"],
            "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"],
        }
        patch = {"metadata": {"ownerReferences": [owner]}}
        self._call(
            f"patch ConfigMap/{configmap}",
            self.core.patch_namespaced_config_map,
            configmap,
            self.namespace,
            patch,
        )

    def _custom_fn(self, verb: str, res: Resource, namespace: str) -> tuple[Any, tuple[Any, ...]]:
        """The CustomObjectsApi method for ``verb`` on ``res`` and its leading arguments."""
        if res.namespaced:
            fn = {"create": self.custom.create_namespaced_custom_object, "get": self.custom.get_namespaced_custom_object,
                  "delete": self.custom.delete_namespaced_custom_object}[verb]  # fmt: skip
            return fn, (res.group, res.version, namespace, res.plural)
        # Cluster-scoped (a TrainJob's ClusterTrainingRuntime): a namespaced Role cannot grant these.
        fn = {"create": self.custom.create_cluster_custom_object, "get": self.custom.get_cluster_custom_object,
              "delete": self.custom.delete_cluster_custom_object}[verb]  # fmt: skip
        return fn, (res.group, res.version, res.plural)

    def get_job(self, name: str, api: JobApi | None = None) -> dict[str, Any] | None:
        """Job ``name`` of ``api``; without one, of whichever job API has it (PyTorchJob first)."""
        if api is not None:
            return self.get(api.kind, name)
        for found in self._each_api(lambda a: self.get_job(name, a), stop=bool):
            if found:
                return found
        return None

    def list_jobs(self, label_selector: str, api: JobApi | None = None) -> list[dict[str, Any]]:
        """Jobs of ``api`` with the labels; without one, of every job API the cluster serves."""
        if api is None:
            return [
                job for jobs in self._each_api(lambda a: self.list_jobs(label_selector, a)) for job in jobs
            ]
        fn = self.custom.list_namespaced_custom_object
        res = api.resource
        result = self._call(f"list {api.kind}s", fn, res.group, res.version, self.namespace, res.plural,
                            label_selector=label_selector)  # fmt: skip
        return list(result.get("items", []))

    def _each_api(self, fn: Any, stop: Any = None) -> list[Any]:
        """``fn(api)`` for each job API, until ``stop(answer)``. An API this account may not read (403) or
        the cluster does not serve (404) is skipped, unless every one is: then the first error is raised."""
        answers, refused = [], []
        for api in JOB_APIS.values():
            try:
                answers.append(fn(api))
            except ClusterUnreachable:
                raise
            except ClusterError as e:
                if e.status not in (403, 404):
                    raise
                refused.append(e)
                continue
            if stop is not None and stop(answers[-1]):
                break
        if not answers:
            raise refused[0]
        return answers

    # ------------------------------------------------------------------ pods, logs, events

    def job_pods(self, job: str, api: JobApi = PYTORCHJOB) -> list[dict[str, Any]]:
        result = self._call(
            f"list pods of {job}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=api.pod_selector(job),
        )
        return self._plain(result).get("items", [])

    def get_pod(self, name: str) -> dict[str, Any] | None:
        return self._missing_ok(f"get Pod/{name}", self.core.read_namespaced_pod, name, self.namespace)

    def pod_log(self, pod: str, container: str, tail_lines: int | None = None, previous: bool = False) -> str:
        # Raw bytes: the client would otherwise json-decode a log that happens to be one JSON document.
        opts: dict[str, Any] = {"container": container, "previous": previous, "_preload_content": False}
        if tail_lines is not None:
            opts["tail_lines"] = tail_lines
        resp = self._call(
            f"logs of {pod}/{container}",
            self.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            hint=_LOG_HINT,
            **opts,
        )
        from urllib3.exceptions import HTTPError

        try:
            return resp.data.decode("utf-8", "replace")
        except HTTPError as e:  # the body is read only now, after the headers came back
            raise self.unreachable(f"logs of {pod}/{container}", e) from None
        finally:
            resp.release_conn()

    def stream_log(self, pod: str, container: str, since_seconds: int | None = None) -> Iterator[str]:
        """Lines of a container's log as they come, each prefixed by its RFC 3339 timestamp; ends when
        the container stops or the connection drops (the caller decides whether to reconnect)."""
        opts: dict[str, Any] = {
            "container": container,
            "follow": True,
            "timestamps": True,
            "_preload_content": False,
        }
        if since_seconds is not None:
            opts["since_seconds"] = since_seconds
        resp = self._call(
            f"logs of {pod}/{container}",
            self.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            hint=_LOG_HINT,
            **opts,
        )
        from urllib3.exceptions import HTTPError

        buffer = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
        except HTTPError:
            pass  # a dropped stream is the caller's cue to reconnect
        finally:
            # Never hand a log connection back to the pool: one the server half-closed would stall the
            # next request on it (seen under load). A new connection per stream costs nothing.
            resp.close()
        if buffer:
            yield buffer.decode("utf-8", "replace")

    def pod_events(self, pod: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind=Pod,involvedObject.name={pod}"
        result = self._call(
            f"events of {pod}", self.core.list_namespaced_event, self.namespace, field_selector=selector
        )
        return self._plain(result).get("items", [])

    def job_events(self, job: str, api: JobApi = PYTORCHJOB) -> list[dict[str, Any]]:
        """Events on the object where the job's controller records why it could not create a pod: the
        PyTorchJob itself, or a TrainJob's child Job (the Job controller creates the pods)."""
        kind, name, _ = api.refusal_event
        selector = f"involvedObject.kind={kind},involvedObject.name={name.format(run=job)}"
        result = self._call(
            f"events of {job}", self.core.list_namespaced_event, self.namespace, field_selector=selector
        )
        return self._plain(result).get("items", [])

    # ------------------------------------------------------------------ doctor's reads

    def job_crd(self) -> dict[str, Any] | None:
        return self.crd(JOB_CRD, "PyTorchJob")

    def crd(self, name: str, kind: str) -> dict[str, Any] | None:
        """The CustomResourceDefinition ``name`` (of ``kind``, for messages), or None when not installed."""
        return self._missing_ok(f"get the {kind} CRD", self.apiext.read_custom_resource_definition, name)

    def namespace_exists(self) -> bool | None:
        """None when we may not read namespaces (common for namespaced CI accounts)."""
        what = f"get Namespace/{self.namespace}"
        found = self._call(what, self.core.read_namespace, self.namespace, statuses={404: False, 403: None})
        return found if found is None or found is False else True

    def secret_keys(self, name: str) -> list[str] | None:
        """The keys of a Secret (never its values), or None when it does not exist."""
        secret = self._missing_ok(
            f"get Secret/{name}", self.core.read_namespaced_secret, name, self.namespace
        )
        return (
            None if secret is None else sorted((secret.get("data") or {}) | (secret.get("stringData") or {}))
        )

    def priority_class_exists(self, name: str) -> bool | None:
        """None when we may not read PriorityClasses (cluster-scoped: a namespaced CI account cannot)."""
        what = f"get PriorityClass/{name}"
        found = self._call(what, self.scheduling.read_priority_class, name, statuses={404: False, 403: None})
        return found if found is None or found is False else True

    def gpu_nodes(self, label_selector: str) -> list[dict[str, Any]]:
        result = self._call("list nodes", self.core.list_node, label_selector=label_selector or None)
        return self._plain(result).get("items", [])


def _retries() -> Any:
    from urllib3.util.retry import Retry

    return Retry(total=1, connect=1, read=0, status=0, other=0, redirect=0)


def _cause(reason: BaseException) -> str:
    """urllib3's reason for a failed request in a few words (its own text repeats the host and the pool)."""
    from urllib3.exceptions import (
        ConnectTimeoutError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ProxyError,
        ReadTimeoutError,
        SSLError,
    )

    connect, read = REQUEST_TIMEOUT
    # Order matters: NameResolutionError < NewConnectionError < ConnectTimeoutError.
    if isinstance(reason, NameResolutionError):
        return f"cannot resolve the host name ({_short(reason.__context__ or reason)})"
    if isinstance(reason, NewConnectionError):
        if isinstance(reason.__context__, ConnectionRefusedError):
            return "connection refused (nothing listens on that port)"
        return f"cannot connect ({_short(reason.__context__ or reason)})"
    if isinstance(reason, ConnectTimeoutError):
        return f"connection timed out after {connect:g} s"
    if isinstance(reason, ReadTimeoutError):
        return f"no answer within {read:g} s (connected, but the server did not reply)"
    if isinstance(reason, SSLError):
        inner = reason.args[0] if reason.args and isinstance(reason.args[0], BaseException) else reason
        return f"TLS handshake failed ({_short(inner)})"
    if isinstance(reason, ProxyError):
        return f"the proxy failed ({_short(reason.__context__ or reason)})"
    if isinstance(reason, ProtocolError):
        return "the connection was dropped"
    return f"{type(reason).__name__}: {_short(reason)}"


def _short(err: BaseException) -> str:
    import ssl

    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {err.verify_message}"
    text = str(err.args[1] if isinstance(err, OSError) and len(err.args) > 1 else err)
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)


def _snake(kind: str) -> str:
    return {"ConfigMap": "config_map", "ServiceAccount": "service_account", "PersistentVolumeClaim": "persistent_volume_claim",
            "Secret": "secret", "Pod": "pod"}[kind]  # fmt: skip


def _api_message(e: Any) -> str:
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or e.reason or "request failed"
    return f"{e.status} {e.reason}: {message}" if e.status else message


def _api_hint(status: int | None) -> str | None:
    return {
        401: "your credentials were rejected: refresh them (e.g. re-run your cloud's get-credentials command)",
        403: "your account lacks a permission: see k8s/rbac-ci.yaml for what the launcher needs",
        404: "is the training-operator installed? `launcher doctor` checks (see k8s/README.md)",
        409: "an object with this name exists already: submit again for a fresh run name",
        422: "the cluster rejected the manifest: `launcher render -o DIR` shows what was sent",
    }.get(status or 0)
