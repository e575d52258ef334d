"""Status and Event writes through the Kubernetes API: plain REST calls with aiohttp, on the event loop.

The credentials come from kopf's own login functions (the service account in a pod, else the
kubeconfig), the same ones its watch uses (``handlers.login``). The official ``kubernetes``
client is not used: it costs about 20 MiB of the process's memory for the five calls made here,
and kopf imports it whenever it is installed, so it is not a dependency either (docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import secrets
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
import kopf

from connector_credentials.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION
from connector_credentials.api.version import __version__
from connector_credentials.core.status import StatusConflict

logger = logging.getLogger(__name__)

COMPONENT = "connector-credential-operator"
MAX_EVENT_MESSAGE = 1024
#: Seconds to open a connection (TCP and TLS), and for a whole request (a listing gets longer).
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 15.0
LIST_TIMEOUT = 30.0
#: Objects per page of the start-up listing.
LIST_PAGE = 250
#: How often the credentials are read again: the kubelet rotates a service account's token
#: file (the official client re-reads it every minute too). A 401 reads them again at once.
RELOGIN_INTERVAL = 60.0
#: Status writes and reads in flight at once (as many as AWS calls, so a first pass does not queue here).
MAX_IN_FLIGHT = 8
#: Events in flight at once, apart: an Event never holds up a status write (the verdict people wait for).
MAX_EVENTS_IN_FLIGHT = 2
#: An Event waits for the status writes queued before it to drain, at most this long (it must not starve).
EVENT_YIELD_TIMEOUT = 30.0
#: How much of the API server's message an error keeps.
MAX_ERROR_MESSAGE = 300

Login = Callable[[], kopf.ConnectionInfo]
Lane = Literal["status", "events", "listing"]


@dataclasses.dataclass(frozen=True)
class CredentialPage:
    """One page of a listing: ``namespace`` is the one listed (``None``: all of them),
    ``resource_version`` the listing's (the snapshot it shows), ``last`` whether it ends the listing."""

    items: list[dict[str, Any]]
    namespace: str | None
    resource_version: str | None
    last: bool


class KubeApiError(Exception):
    """A non-2xx answer of the API server: ``status`` (the HTTP code), ``reason`` (its phrase)
    and ``message`` (the API server's explanation, from its Status object, shortened)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status} {reason}".strip() + (f": {message}" if message else ""))


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere: the current kubeconfig (``KUBECONFIG``).

    In a pod the API server is addressed as client-go's in-cluster config addresses it: by
    ``KUBERNETES_SERVICE_HOST`` and ``KUBERNETES_SERVICE_PORT``, which the kubelet injects into
    every container, rather than by kopf's ``https://kubernetes.default.svc``: a DNS name, so the
    operator would need cluster DNS to reach the API server, and a DNS outage would stop it.
    """
    info = kopf.login_with_service_account(settings=settings)
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if info is not None and host and port:
        return dataclasses.replace(info, server=f"https://{f'[{host}]' if ':' in host else host}:{port}")
    return info or kopf.login_with_kubeconfig(settings=settings)


def default_login() -> kopf.ConnectionInfo:
    """In a pod: its service account; elsewhere: the current kubeconfig (``KUBECONFIG``).

    kopf's own minimal logins (:func:`login`, as the watch uses): a token, a client
    certificate or a username and password. Kubeconfig ``exec`` plugins and auth providers that
    need refreshing are not run (kopf's watch has the same limit).
    """
    settings = kopf.OperatorSettings()
    try:
        info = login(settings)
    except kopf.LoginError:
        raise
    except Exception as exc:  # a kubeconfig that is missing, unreadable or lacks its context
        raise kopf.LoginError(f"cannot use the kubeconfig: {type(exc).__name__}: {exc}") from exc
    if info is None:
        raise kopf.LoginError("no service account token (not in a pod?) and no kubeconfig (KUBECONFIG, ~/.kube/config)")
    return info


@dataclasses.dataclass(frozen=True)
class _Credentials:
    info: kopf.ConnectionInfo
    base: str
    headers: dict[str, str]
    tls: ssl.SSLContext
    at: float


class KubeStatusSink:
    """Implements :class:`connector_credentials.core.status.StatusSink` (and the start-up calls of the CLI).

    Create it and close it (``await sink.close()``) on the running event loop; the HTTP session
    is opened with the first request.
    """

    def __init__(self, login: Login = default_login, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._login = login
        self._max_in_flight = max_in_flight
        # Logged in at once: without any credentials the operator cannot start at all.
        self._credentials = self._fresh(None, tls=True)
        self._session: aiohttp.ClientSession | None = None
        self._lanes: dict[Lane, asyncio.Semaphore] = {
            "status": asyncio.Semaphore(max_in_flight),
            "events": asyncio.Semaphore(MAX_EVENTS_IN_FLIGHT),
            # The start-up listing's pages must not queue behind the status writes of the pages before.
            "listing": asyncio.Semaphore(1),
        }
        self._busy = 0  # other requests waiting or in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._instance = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or COMPONENT

    # --- the StatusSink protocol --------------------------------------------------------------

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        # resourceVersion in a merge patch is a precondition: a stale one gets 409 Conflict.
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            result = await self._request(
                "PATCH",
                _object_path(namespace, name) + "/status",
                body=body,
                content_type="application/merge-patch+json",
            )
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:
                raise StatusConflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from None
            raise
        return _with_status_interned(result) if isinstance(result, dict) else {}

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result = await self._request("GET", _object_path(namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return _with_status_interned(result) if isinstance(result, dict) else None

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None:
        # Built once the Event's turn comes (its time is then the time it is posted), not while it waits.
        def body() -> dict[str, Any]:
            return self._event_body(namespace, name, uid, warning=warning, reason=reason, message=message)

        await self._request("POST", f"/api/v1/namespaces/{_quote(namespace)}/events", body=body, lane="events")

    def _event_body(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if len(message) > MAX_EVENT_MESSAGE:
            message = message[: MAX_EVENT_MESSAGE - 3] + "..."
        return {
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

    # --- start-up -------------------------------------------------------------------------------

    async def crd_served(self) -> bool:
        """Whether the API serves ConnectorCredentials (discovery; every authenticated user may ask)."""
        try:
            answer = await self._request("GET", f"/apis/{GROUP}/{VERSION}")
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        resources = answer.get("resources") if isinstance(answer, dict) else None
        return any(isinstance(r, dict) and r.get("name") == PLURAL for r in resources or [])

    async def list_credentials(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every ConnectorCredential in ``namespaces`` (``None``: all namespaces)."""
        return [item async for page in self.credential_pages(namespaces) for item in page.items]

    async def credential_pages(
        self, namespaces: list[str] | None, *, limit: int = LIST_PAGE
    ) -> AsyncIterator[CredentialPage]:
        """The same, a page at a time: at 10,000 objects a single listing is tens of MiB held at once.

        One listing per namespace (or one of all namespaces), each a snapshot at its own
        resourceVersion: the pages of one listing (``continue``) are read at the first one's.
        """
        scopes: list[str | None] = [None] if namespaces is None else list(namespaces)
        for scope in scopes:
            if scope is None:
                path = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
            else:
                path = f"/apis/{GROUP}/{VERSION}/namespaces/{_quote(scope)}/{PLURAL}"
            token: str | None = None
            while True:
                query = f"?limit={limit}" + (f"&continue={urllib.parse.quote(token, safe='')}" if token else "")
                answer = await self._request("GET", path + query, total=LIST_TIMEOUT, lane="listing")
                meta = (answer.get("metadata") if isinstance(answer, dict) else None) or {}
                token = meta.get("continue") or None
                items = answer.get("items") if isinstance(answer, dict) else None
                version = meta.get("resourceVersion")
                yield CredentialPage(
                    items=[item for item in items or [] if isinstance(item, dict)],
                    namespace=scope,
                    resource_version=version if isinstance(version, str) and version else None,
                    last=token is None,
                )
                if token is None:
                    break

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- HTTP -------------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        total: float = REQUEST_TIMEOUT,
        lane: Lane = "status",
    ) -> Any:
        """The parsed JSON of a 2xx answer (``None`` if there is none); :class:`KubeApiError` otherwise.

        ``lane``: status writes and reads share 8 slots; Events have 2 of their own and wait for
        the status writes queued before them; the start-up listing has 1 of its own. ``body`` is
        encoded once a slot is free (a callable is called then): thousands of writes may wait.
        """
        limits = aiohttp.ClientTimeout(total=total, connect=CONNECT_TIMEOUT)
        events = lane == "events"
        if events:
            # Events go after the status writes that are waiting: at start, the verdicts first.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENT_YIELD_TIMEOUT):
                    await self._idle.wait()
        else:
            self._busy += 1
            self._idle.clear()
        try:
            async with self._lanes[lane]:
                payload = body() if callable(body) else body
                data = None if payload is None else json.dumps(payload).encode("utf-8")
                return await self._send(method, path, data, content_type, limits)
        finally:
            if not events:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _send(
        self, method: str, path: str, data: bytes | None, content_type: str, limits: aiohttp.ClientTimeout
    ) -> Any:
        session = self._open()
        relogged = False
        while True:
            credentials = self._current()
            headers = {"Accept": "application/json", **credentials.headers}
            if data is not None:
                headers["Content-Type"] = content_type
            async with session.request(
                method,
                credentials.base + path,
                data=data,
                headers=headers,
                ssl=credentials.tls,
                proxy=credentials.info.proxy_url,
                timeout=limits,
                allow_redirects=False,
            ) as response:
                raw = await response.read()
                if response.status == 401 and not relogged:
                    # The token was rotated (or revoked): read the credentials again, retry once.
                    relogged = True
                    if self._relogin():
                        continue
                if 200 <= response.status < 300:
                    return _parse(raw)
                raise _error(response.status, response.reason, raw)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_in_flight + MAX_EVENTS_IN_FLIGHT + 1),
                headers={"User-Agent": f"{COMPONENT}/{__version__}"},
                trust_env=self._credentials.info.trust_env,
            )
        return self._session

    def _relogin(self) -> bool:
        logger.info("The Kubernetes API answered 401 Unauthorized; reading the credentials again.")
        try:
            self._credentials = self._fresh(self._credentials, tls=True)
        except Exception as exc:  # noqa: BLE001 - the 401 is what the caller hears about
            logger.warning("Reading the Kubernetes credentials again failed (%s).", type(exc).__name__)
            return False
        return True

    def _current(self) -> _Credentials:
        if time.monotonic() - self._credentials.at >= RELOGIN_INTERVAL:
            try:
                self._credentials = self._fresh(self._credentials, tls=False)
            except Exception as exc:  # noqa: BLE001 - the credentials held may still work
                logger.warning(
                    "Reading the Kubernetes credentials again failed (%s); using the ones held.", type(exc).__name__
                )
                self._credentials = dataclasses.replace(self._credentials, at=time.monotonic())
        return self._credentials

    def _fresh(self, old: _Credentials | None, *, tls: bool) -> _Credentials:
        """Log in again; the TLS context is rebuilt when asked or when more than the token changed."""
        info = self._login()
        if not tls and old is not None and _endpoint(old.info) == _endpoint(info):
            context = old.tls  # the same connections go on being used
        else:
            context = info.as_ssl_context()
        return _Credentials(
            info=info,
            base=info.server.rstrip("/"),
            headers=info.as_http_headers(),
            tls=context,
            at=time.monotonic(),
        )


def interned(value: Any) -> Any:
    """``value`` (a parsed JSON document or one of kopf's views of it) as plain dicts and lists, each
    key and text interned: kept for thousands of objects (their status, held by the engine), they
    are then held once."""
    if hasattr(value, "items"):
        return {sys.intern(str(k)): interned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [interned(v) for v in value]
    if isinstance(value, str):
        return sys.intern(value)
    return value


def _with_status_interned(body: dict[str, Any]) -> dict[str, Any]:
    """The object with its status interned (the writer keeps it); the rest is dropped after use."""
    if isinstance(body.get("status"), dict):
        return {**body, "status": interned(body["status"])}
    return body


def _endpoint(info: kopf.ConnectionInfo) -> kopf.ConnectionInfo:
    """Everything but the token and its expiry: what the TLS context and the URL come from."""
    return dataclasses.replace(info, token=None, expiration=None)


def _object_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{_quote(namespace)}/{PLURAL}/{_quote(name)}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error(status: int, reason: str | None, raw: bytes) -> KubeApiError:
    """The API server's Status object (``{"reason": "Conflict", "message": ...}``) as an exception."""
    answer = _parse(raw)
    message = ""
    if isinstance(answer, dict):
        message = str(answer.get("message") or "")
        reason = reason or str(answer.get("reason") or "")
    message = " ".join(message.split())
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return KubeApiError(status, reason or "", message)
