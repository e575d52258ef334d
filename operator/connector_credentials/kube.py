"""Status and Event writes through the Kubernetes API (the official client, off the event loop)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from connector_credentials.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from connector_credentials.status import StatusConflict

logger = logging.getLogger(__name__)

COMPONENT = "connector-credential-operator"
MAX_EVENT_MESSAGE = 1024


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster configuration in a pod, else the current kubeconfig (``KUBECONFIG``)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient(configuration)


class KubeStatusSink:
    """Implements :class:`connector_credentials.engine.StatusSink` with the official client."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self._api_client = api_client or load_api_client()
        self._custom = kubernetes.client.CustomObjectsApi(self._api_client)
        self._core = kubernetes.client.CoreV1Api(self._api_client)
        # The client is blocking; a few threads keep status writes off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kube")
        self._instance = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or COMPONENT

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        # resourceVersion in a merge patch is a precondition: a stale one gets 409 Conflict.
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}

        def call() -> dict[str, Any] | None:
            try:
                result = self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    body,
                    _request_timeout=(5, 15),
                    _content_type="application/merge-patch+json",
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status == 409:
                    raise StatusConflict(
                        f"{namespace}/{name} changed since resourceVersion {resource_version}"
                    ) from None
                raise
            return result if isinstance(result, dict) else {}

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        def call() -> dict[str, Any] | None:
            try:
                result = self._custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _request_timeout=(5, 15)
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return result if isinstance(result, dict) else None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None:
        now = datetime.datetime.now(datetime.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if len(message) > MAX_EVENT_MESSAGE:
            message = message[: MAX_EVENT_MESSAGE - 3] + "..."
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named like client-go's recorder does (<object>.<unique hex>): no generateName needed.
            "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": name,
                "namespace": namespace,
                **({"uid": uid} if uid else {}),
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "eventTime": micro,
            "count": 1,
            "action": "Check",
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": self._instance[:128],
        }

        def call() -> None:
            # A plain dict: the client serialises it as is (CoreV1Event.from_dict is not in every
            # client version). Say it is JSON: this client sends no Content-Type here unless told.
            self._core.create_namespaced_event(
                namespace,
                body,  # type: ignore[arg-type]
                _request_timeout=(5, 15),
                _content_type="application/json",
            )

        await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def crd_served(self) -> bool:
        """Whether the API serves ConnectorCredentials (discovery; every authenticated user may ask)."""

        def call() -> bool:
            try:
                answer = self._custom.get_api_resources(GROUP, VERSION, _request_timeout=(5, 15))
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return any(resource.name == PLURAL for resource in answer.resources or [])

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def list_credentials(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every ConnectorCredential in ``namespaces`` (``None``: all namespaces)."""

        def call() -> list[dict[str, Any]]:
            if namespaces is None:
                answers = [self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=(5, 30))]
            else:
                answers = [
                    self._custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _request_timeout=(5, 30))
                    for ns in namespaces
                ]
            items: list[dict[str, Any]] = []
            for answer in answers:
                if isinstance(answer, dict):
                    items.extend(item for item in answer.get("items", []) if isinstance(item, dict))
            return items

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()  # type: ignore[no-untyped-call]
