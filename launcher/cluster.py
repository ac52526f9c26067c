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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.errors import EXIT_FAILED, UserError

JOB_GROUP, JOB_VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_CRD = "pytorchjobs.kubeflow.org"
# Labels the training-operator puts on a job's pods.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
_LOG_HINT = "`launcher status NAME` lists the run's pods and containers (e.g. --replica worker-0, -c sglang)"
REQUEST_TIMEOUT = (10, 60)  # connect, read (seconds)
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(UserError):
    """The API server refused or could not be reached; not a usage error."""

    exit_code = EXIT_FAILED


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
            except config.ConfigException as e:
                raise UserError(
                    path, f"unusable kubeconfig: {e}", hint="check --kubeconfig and --context"
                ) from None
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
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

    # ------------------------------------------------------------------ error translation

    def _call(self, what: str, fn: Any, *args: Any, hint: str | None = None, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        # A dead API server must not hang the launcher; log streams wait as long as the container runs.
        if not kwargs.get("follow"):
            kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise ClusterError(what, _api_message(e), hint=hint or _api_hint(e.status)) from None
        except HTTPError as e:
            raise ClusterError(
                what,
                f"cannot reach the API server at {self.host}: {e}",
                hint="check the cluster and --context",
            ) from None

    def _missing_ok(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn``'s result as a dict, or None on 404."""
        from kubernetes.client.exceptions import ApiException

        try:
            result = fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ClusterError(what, _api_message(e), hint=_api_hint(e.status)) from None
        return self._plain(result)

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
        if kind == "PyTorchJob":
            fn = self.custom.create_namespaced_custom_object
            return self._plain(self._call(what, fn, JOB_GROUP, JOB_VERSION, ns, JOB_PLURAL, obj, **opts))
        fn = getattr(self.core, f"create_namespaced_{_snake(kind)}")
        return self._plain(self._call(what, fn, ns, obj, **opts))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        if kind == "PyTorchJob":
            return self.get_job(name)
        fn = getattr(self.core, f"read_namespaced_{_snake(kind)}")
        return self._missing_ok(f"get {kind}/{name}", fn, name, self.namespace)

    def delete(self, kind: str, name: str) -> bool:
        """Delete in the background (pods and owned ConfigMap go with the job); False when already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "PyTorchJob":
                self.custom.delete_namespaced_custom_object(
                    JOB_GROUP, JOB_VERSION, self.namespace, JOB_PLURAL, name, propagation_policy="Background"
                )
            else:
                getattr(self.core, f"delete_namespaced_{_snake(kind)}")(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise ClusterError(f"delete {kind}/{name}", _api_message(e), hint=_api_hint(e.status)) from None
        return True

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

    def get_job(self, name: str) -> dict[str, Any] | None:
        fn = self.custom.get_namespaced_custom_object
        return self._missing_ok(
            f"get PyTorchJob/{name}", fn, JOB_GROUP, JOB_VERSION, self.namespace, JOB_PLURAL, name
        )

    def list_jobs(self, label_selector: str) -> list[dict[str, Any]]:
        fn = self.custom.list_namespaced_custom_object
        result = self._call(
            "list PyTorchJobs",
            fn,
            JOB_GROUP,
            JOB_VERSION,
            self.namespace,
            JOB_PLURAL,
            label_selector=label_selector,
        )
        return list(result.get("items", []))

    # ------------------------------------------------------------------ pods, logs, events

    def job_pods(self, job: str) -> list[dict[str, Any]]:
        result = self._call(
            f"list pods of {job}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOB_NAME_LABEL}={job}",
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
        try:
            return resp.data.decode("utf-8", "replace")
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

    # ------------------------------------------------------------------ doctor's reads

    def job_crd(self) -> dict[str, Any] | None:
        return self._missing_ok(
            "get the PyTorchJob CRD", self.apiext.read_custom_resource_definition, JOB_CRD
        )

    def namespace_exists(self) -> bool | None:
        """None when we may not read namespaces (common for namespaced CI accounts)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.read_namespace(self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 403:
                return None
            raise ClusterError(f"get Namespace/{self.namespace}", _api_message(e)) from None
        return True

    def secret_keys(self, name: str) -> list[str] | None:
        """The keys of a Secret (never its values), or None when it does not exist."""
        secret = self._missing_ok(
            f"get Secret/{name}", self.core.read_namespaced_secret, name, self.namespace
        )
        return (
            None if secret is None else sorted((secret.get("data") or {}) | (secret.get("stringData") or {}))
        )

    def gpu_nodes(self, label_selector: str) -> list[dict[str, Any]]:
        result = self._call("list nodes", self.core.list_node, label_selector=label_selector or None)
        return self._plain(result).get("items", [])


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
