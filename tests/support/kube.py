"""The tests' side of a real API server: an admin client for setup and inspection, service-account
credentials for the operator, and the shipped RBAC applied per namespace.

Everything goes through the real kube-apiserver (``tests.support.controlplane``), so schema and
CEL validation, RBAC, dry-run, selectors and watch semantics are the server's own.
"""

from __future__ import annotations

import builtins
import copy
import functools
import http.client
import json
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.controlplane import ControlPlane, kubeconfig

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ACCOUNT = "xpander-controller"


class KubeApiError(Exception):
    """A non-2xx answer of the API server (``body`` is its Status object)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl is not installed (it is needed to apply manifests and for the CLI tests)")
    return found


def resource_path(resource: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    """``group/version/plural`` (or ``version/plural`` for the core group) as a REST path."""
    *group_version, plural = resource.split("/")
    prefix = "/api/" if len(group_version) == 1 else "/apis/"
    path = prefix + "/".join(group_version)
    if namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class Cluster:
    """Admin access to a cluster: the local control plane (a ``system:masters`` client certificate)
    or, with :func:`existing_cluster`, the cluster of a kubeconfig."""

    def __init__(
        self,
        plane: ControlPlane | None = None,
        *,
        server: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
        admin_kubeconfig: Path | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if plane is not None:
            server, ssl_context, ca_file, admin_kubeconfig = (
                plane.url,
                plane.ssl_context(),
                plane.ca_file,
                plane.kubeconfig,
            )
        assert server is not None and ssl_context is not None and admin_kubeconfig is not None
        self.url = server.rstrip("/")
        split = urllib.parse.urlsplit(self.url)
        self._host, self._port = split.hostname or "127.0.0.1", split.port or 443
        self._context = ssl_context
        self.ca_file = ca_file
        self.admin_kubeconfig = admin_kubeconfig
        self._headers = dict(headers or {})
        self._listable: builtins.list[str] | None = None

    # -- raw REST --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        connection = http.client.HTTPSConnection(self._host, self._port, context=self._context, timeout=30)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json", **self._headers}
            if data is not None:
                headers["Content-Type"] = content_type
            connection.request(method, path, body=data, headers=headers)
            answer = connection.getresponse()
            raw = answer.read()
        finally:
            connection.close()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return answer.status, parsed

    def checked(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, parsed = self.request(method, path, body, **kwargs)
        if status >= 300:
            raise KubeApiError(status, parsed)
        return parsed

    # -- objects ---------------------------------------------------------------------------

    def create(self, resource: str, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.checked("POST", resource_path(resource, namespace), dict(body)))

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        patch_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        path = resource_path(resource, namespace, name, subresource)
        return dict(self.checked("PATCH", path, patch, content_type=patch_type))

    def apply(
        self, resource: str, namespace: str | None, body: Mapping[str, Any], *, manager: str = "ccred-tests"
    ) -> dict[str, Any]:
        """Server-side apply (create or update): idempotent, as ``kubectl apply --server-side``."""
        path = resource_path(resource, namespace, str(body["metadata"]["name"]))
        query = {"fieldManager": manager, "force": "true"}
        return dict(self.checked("PATCH", path, dict(body), content_type="application/apply-patch+yaml", query=query))

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        status, parsed = self.request("GET", resource_path(resource, namespace, name))
        if status == 404:
            return None
        if status >= 300:
            raise KubeApiError(status, parsed)
        return dict(parsed)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        status, parsed = self.request("DELETE", resource_path(resource, namespace, name))
        if status == 404:
            return None
        if status >= 300:
            raise KubeApiError(status, parsed)
        return dict(parsed)

    def list(self, resource: str, namespace: str | None = None, **query: str) -> builtins.list[dict[str, Any]]:
        answer = self.checked("GET", resource_path(resource, namespace), query=query or None)
        return [dict(item) for item in answer.get("items") or []]

    def events(self, namespace: str) -> builtins.list[dict[str, Any]]:
        return self.list("v1/events", namespace)

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create("v1/namespaces", None, {"metadata": {"name": name}})

    def list_objects(self) -> builtins.list[dict[str, Any]]:
        """Every object of every listable resource in the cluster (Secrets and Events included)."""
        found: builtins.list[dict[str, Any]] = []
        for resource in self.listable_resources():
            status, answer = self.request("GET", resource_path(resource, None))
            if status == 200 and isinstance(answer, dict):
                found.extend(answer.get("items") or [])
        return found

    def listable_resources(self) -> builtins.list[str]:
        if self._listable is None:
            self._listable = list(self._discover())
        return self._listable

    def _discover(self) -> Iterator[str]:
        versions = ["v1"]
        for group in self.checked("GET", "/apis").get("groups") or []:
            versions.append(group["preferredVersion"]["groupVersion"])
        for group_version in versions:
            prefix = "/api/" if group_version == "v1" else "/apis/"
            for item in self.checked("GET", prefix + group_version).get("resources") or []:
                if "/" not in item["name"] and "list" in item.get("verbs", []):
                    yield f"{group_version}/{item['name']}"

    # -- manifests and identities ----------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin."""
        return subprocess.run(
            [kubectl(), f"--kubeconfig={self.admin_kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def apply_crds(self, timeout: float = 60.0) -> None:
        self.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "connectorcredentials.yaml"))
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/connectorcredentials.connectors.xpander.ai"
        deadline = time.monotonic() + timeout
        while True:
            status, crd = self.request("GET", path)
            conditions = (crd or {}).get("status", {}).get("conditions") or [] if status == 200 else []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the CRD is not Established after {timeout:.0f}s: HTTP {status} {conditions}")
            time.sleep(0.1)

    def install_operator_identity(self, namespace: str, service_account: str = SERVICE_ACCOUNT) -> None:
        """The ServiceAccount and the shipped Role and RoleBinding (rendered from deploy/) in ``namespace``."""
        self.apply(
            "v1/serviceaccounts",
            namespace,
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account}},
        )
        for doc in shipped_rbac(namespace):
            for subject in doc.get("subjects") or []:
                subject["name"] = service_account
            plural = doc["kind"].lower() + "s"
            scope = namespace if doc["kind"] in ("Role", "RoleBinding") else None
            self.apply(f"rbac.authorization.k8s.io/v1/{plural}", scope, doc)

    def service_account_token(self, namespace: str, service_account: str = SERVICE_ACCOUNT, seconds: int = 7200) -> str:
        """A TokenRequest token, what a projected service-account volume holds in a pod."""
        path = resource_path("v1/serviceaccounts", namespace, service_account, "token")
        answer = self.checked("POST", path, {"spec": {"expirationSeconds": seconds}})
        return str(answer["status"]["token"])

    def write_kubeconfig(
        self, path: Path, *, token: str, namespace: str = "default", server: str | None = None, name: str = "operator"
    ) -> Path:
        """A kubeconfig holding a bearer token (a service account's), pointing at ``server``."""
        path.write_text(
            kubeconfig(
                server=server or self.url, ca_file=self.ca_file, user={"token": token}, name=name, namespace=namespace
            )
        )
        path.chmod(0o600)
        return path


def existing_cluster(path: Path) -> Cluster:
    """Admin access through an existing kubeconfig (its current context), e.g. kind's."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    headers = {}
    if token := (configuration.api_key or {}).get("authorization"):
        headers["Authorization"] = token
    ca_file = Path(configuration.ssl_ca_cert) if configuration.ssl_ca_cert else None
    return Cluster(
        server=configuration.host, ssl_context=context, ca_file=ca_file, admin_kubeconfig=path, headers=headers
    )


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` as a list of objects (a fresh copy each call)."""
    return copy.deepcopy(_render(str(directory)))


@functools.cache
def _render(directory: str) -> list[dict[str, Any]]:
    output = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def shipped_rbac(namespace: str) -> list[dict[str, Any]]:
    """The Role and RoleBinding exactly as ``deploy/`` ships them, moved to ``namespace``."""
    docs = [
        doc
        for doc in render(ROOT / "deploy")
        if doc["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            subject["namespace"] = namespace
    return docs
