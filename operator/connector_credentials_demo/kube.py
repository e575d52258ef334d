"""A Kubernetes API emulator (kmock) in a background thread, for subprocess-level tests.

The operator under test runs as a subprocess and the tests are synchronous, so the
emulator lives in its own thread with its own asyncio loop and is reached over HTTP
at ``KubeEmulator.url`` (a plain-http cluster without auth, see ``write_kubeconfig``).

``ApiServerEmulator`` fills the gaps of kmock 0.8 that real clients notice: names from
``generateName``, ``uid``/``creationTimestamp``/``resourceVersion``/``generation``,
status-subresource semantics, JSON patches (kopf's ``test`` ops), no-op writes that emit
nothing, list ``kind``/``apiVersion``, ``timeoutSeconds`` on watches; plus fault injection.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import gzip
import importlib.resources
import json
import re
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import aiohttp.web
import attrs
import kmock
import yaml
from typing_extensions import override

from connector_credentials_demo.lifecycle import Service

T = TypeVar("T")

# Requests carrying this header (the harness's own helpers) are never hit by injected faults.
HARNESS_HEADER = "X-Test-Harness"
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
MERGE_PATCH_TYPES = {
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",  # CRs reject it for real; treating it as merge is harmless
    "application/json",
    "",
}
JSON_PATCH_TYPE = "application/json-patch+json"
CORE_EVENTS = kmock.resource("v1/events")
NAMESPACES = kmock.resource("v1/namespaces")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# kmock 0.8 cannot parse these (it takes "namespaces" for the namespace prefix of a namespaced path).
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?")
EVENTS_V1 = kmock.resource("events.k8s.io/v1/events")
DEFAULT_COLUMNS: list[dict[str, Any]] = [
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
EVENT_COLUMNS: list[dict[str, Any]] = [  # what a real API server prints for Events (minus the wide ones)
    {"name": "Last Seen", "type": "date", "jsonPath": ".lastTimestamp"},
    {"name": "Type", "type": "string", "jsonPath": ".type"},
    {"name": "Reason", "type": "string", "jsonPath": ".reason"},
    {"name": "Object", "type": "string", "jsonPath": ".involvedObject"},
    {"name": "Message", "type": "string", "jsonPath": ".message"},
]
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName suffixes


class KubeApiError(Exception):
    """A non-2xx answer to one of the harness's own requests."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


@dataclass
class Fault:
    """An injected failure: requests matching ``method`` and ``path`` get ``status``, ``times`` times."""

    method: str | None
    path: re.Pattern[str]
    status: int
    reason: str
    message: str
    times: int | None  # None: forever
    hits: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method.upper()) and bool(self.path.search(path))


class _PatchError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _object_not_found(resource: kmock.resource, name: str | None) -> aiohttp.web.Response:
    return _status_response(
        404, "NotFound", f'{resource.plural} "{name}" not found', {"name": name, "kind": resource.plural}
    )


def _status_response(
    status: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": status,
        "reason": reason,
        "message": message,
        "details": dict(details or {}),
    }
    return aiohttp.web.json_response(body, status=status)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``None`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _PatchError(422, "Invalid", f"invalid JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise _PatchError(422, "Invalid", f"path not found: /{'/'.join(parts)}") from None
    return node, parts[-1]


def _get_at(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    node, key = _parent(doc, parts)
    try:
        return node[int(key)] if isinstance(node, list) else node[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise _PatchError(422, "Invalid", f"path not found: /{'/'.join(parts)}") from None


def _remove_at(doc: Any, parts: list[str]) -> Any:
    node, key = _parent(doc, parts)
    value = _get_at(doc, parts)
    if isinstance(node, list):
        del node[int(key)]
    else:
        del node[key]
    return value


def _add_at(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    node, key = _parent(doc, parts)
    if isinstance(node, list):
        index = len(node) if key == "-" else int(key)
        if not 0 <= index <= len(node):
            raise _PatchError(422, "Invalid", f"index out of range: {key}")
        node.insert(index, value)
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise _PatchError(422, "Invalid", f"cannot add into a scalar at {key!r}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add/remove/replace/move/copy/test); a failed ``test`` is a 422 like the API's."""
    if not isinstance(ops, list):
        raise _PatchError(400, "BadRequest", "a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        if kind == "add":
            result = _add_at(result, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove_at(result, parts)
        elif kind == "replace":
            _get_at(result, parts)  # must exist
            if parts:
                _remove_at(result, parts)
            result = _add_at(result, parts, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _remove_at(result, source) if kind == "move" else copy.deepcopy(_get_at(result, source))
            result = _add_at(result, parts, value)
        elif kind == "test":
            if _get_at(result, parts) != op.get("value"):
                raise _PatchError(422, "Invalid", f"the test operation failed at {op.get('path')!r}")
        else:
            raise _PatchError(422, "Invalid", f"unknown JSON patch operation: {kind!r}")
    return result


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


_JSONPATH_STEP = re.compile(
    r"\.(?P<key>[A-Za-z0-9_\-]+)"
    r"|\[\?\(@\.(?P<field>[A-Za-z0-9_.\-]+)\s*==\s*[\"'](?P<value>[^\"']*)[\"']\)\]"
    r"|\[(?P<index>\d+|\*)\]"
)


def jsonpath_values(obj: Any, path: str) -> list[Any]:
    """The subset of kubectl's JSONPath that printer columns use: ``.a.b``, ``[0]``, ``[*]``, ``[?(@.k=="v")]``."""
    path = path.strip().removeprefix("{").removesuffix("}").removeprefix("$")
    nodes, pos = [obj], 0
    while pos < len(path):
        step = _JSONPATH_STEP.match(path, pos)
        if step is None:
            raise ValueError(f"unsupported JSONPath: {path!r}")
        pos, found = step.end(), []
        for node in nodes:
            if step["key"] is not None and isinstance(node, dict) and step["key"] in node:
                found.append(node[step["key"]])
            elif step["field"] is not None and isinstance(node, list):
                for item in node:
                    probe = jsonpath_values(item, "." + step["field"])
                    if probe and str(probe[0]) == step["value"]:
                        found.append(item)
            elif step["index"] == "*" and isinstance(node, list):
                found.extend(node)
            elif step["index"] is not None and isinstance(node, list) and int(step["index"]) < len(node):
                found.append(node[int(step["index"])])
        nodes = found
    return nodes


def human_age(timestamp: str) -> str:
    """kubectl's ``HumanDuration`` of the time since an RFC 3339 timestamp (``5s``, ``3m20s``, ``2d``)."""
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    seconds = int((datetime.datetime.now(tz=datetime.UTC) - then).total_seconds())
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def _as_events_v1(core: Mapping[str, Any]) -> dict[str, Any]:
    """A core/v1 Event as events.k8s.io/v1 serves it (same store, renamed fields)."""
    source = core.get("source") or {}
    converted = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": copy.deepcopy(core.get("metadata", {})),
        "eventTime": core.get("eventTime"),
        "reason": core.get("reason"),
        "note": core.get("message"),
        "type": core.get("type"),
        "regarding": core.get("involvedObject"),
        "related": core.get("related"),
        "action": core.get("action"),
        "series": core.get("series"),
        "reportingController": core.get("reportingComponent") or source.get("component"),
        "reportingInstance": core.get("reportingInstance") or source.get("host"),
        "deprecatedSource": source or None,
        "deprecatedFirstTimestamp": core.get("firstTimestamp"),
        "deprecatedLastTimestamp": core.get("lastTimestamp"),
        "deprecatedCount": core.get("count"),
    }
    return {key: value for key, value in converted.items() if value is not None}


def _as_core_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The reverse of ``_as_events_v1``, enough for the table columns."""
    return {
        "metadata": event.get("metadata", {}),
        "type": event.get("type"),
        "reason": event.get("reason"),
        "message": event.get("note"),
        "involvedObject": event.get("regarding") or {},
        "lastTimestamp": event.get("deprecatedLastTimestamp"),
        "eventTime": event.get("eventTime"),
    }


def _event_object(event: Mapping[str, Any]) -> str:
    involved = event.get("involvedObject") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def _namespace_defaults(obj: dict[str, Any]) -> None:
    # What a real API server fills in on every Namespace.
    name = obj["metadata"]["name"]
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    obj.setdefault("spec", {"finalizers": ["kubernetes"]})
    obj["status"] = {"phase": "Active"}


async def _namespace_request(
    raw: aiohttp.web.BaseRequest, name: str | None, subresource: str | None, request_id: int
) -> kmock.Request:
    """Parse a /api/v1/namespaces[/name] request the way kmock parses every other one."""
    body = await raw.read()
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    method, query = raw.method.upper(), dict(raw.query)
    action: kmock.action | None
    if method == "GET" and query.get("watch") == "true":
        action = kmock.action.WATCH
    elif name is None:
        action = {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(method)
    else:
        action = {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(method)
    return kmock.Request(
        id=request_id,
        raw_request=raw,
        url=raw.url,
        method=raw.method,
        params=query,
        headers=dict(raw.headers),
        cookies=dict(raw.cookies),
        data=data,
        body=body,
        text=body.decode("utf-8", "replace"),
        action=action,
        resource=NAMESPACES,
        namespace=None,
        name=name,
        subresource=subresource,
    )


def _spec_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    # Generation counts changes of everything but metadata and status, as for custom resources.
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the write semantics of a real API server and fault injection."""

    _revision: int = attrs.field(default=0, init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _faults_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _watch_drop: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    printer_columns: dict[kmock.resource, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    active_watches: int = attrs.field(default=0, init=False)
    #: While set, watch streams stay open but silent and ignore timeoutSeconds: a stalled stream.
    stalled: bool = attrs.field(default=False, init=False)

    # -- fault injection (callable from any thread) --------------------------------------------

    def add_fault(
        self,
        method: str | None,
        path: str | re.Pattern[str],
        *,
        status: int = 500,
        reason: str | None = None,
        message: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Answer the next ``times`` requests matching method + path regex with a Status error."""
        default_reasons = {
            409: "Conflict",
            500: "InternalError",
            503: "ServiceUnavailable",
            429: "TooManyRequests",
            404: "NotFound",
            403: "Forbidden",
        }
        fault = Fault(
            method=method,
            path=re.compile(path) if isinstance(path, str) else path,
            status=status,
            reason=reason or default_reasons.get(status, "InternalError"),
            message=message or f"injected fault: HTTP {status}",
            times=times,
        )
        with self._faults_lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def _take_fault(self, request: kmock.Request) -> Fault | None:
        if any(key.lower() == HARNESS_HEADER.lower() for key in request.headers):
            return None
        with self._faults_lock:
            for fault in self._faults:
                if fault.active and fault.matches(str(request.method.value), request.url.path):
                    fault.hits += 1
                    return fault
        return None

    async def drop_watches(self, *, closing: bool = False) -> int:
        """End every open watch stream (as an API server restart does); return how many were open."""
        self._closing = self._closing or closing
        count = self.active_watches
        if self._watch_drop is not None:
            self._watch_drop.set()
        self._watch_drop = asyncio.Event()
        await asyncio.sleep(0)  # let the streams see it
        return count

    # -- request handling --------------------------------------------------------------------

    @override
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACE_PATH.fullmatch(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        request = await _namespace_request(raw_request, match["name"], match["sub"], len(self._requests))
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as exc:
            response = exc.args[0] if exc.args and isinstance(exc.args[0], aiohttp.web.StreamResponse) else None
            if response is not None and response.prepared:
                return response  # a stream broke midway: the client sees it end
            return await self._render_error(exc)

    def ensure_namespace(self, name: str) -> None:
        """Store a Namespace directly (no watch event): for the namespaces that exist from the start."""
        key = (NAMESPACES, None, name)
        if key not in self.objects or self.objects[key].deleted:
            obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            _namespace_defaults(obj)
            obj["metadata"].update(
                uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_revision()
            )
            self.objects[key] = obj

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        # Not .get(): ResourcesArray auto-creates missing keys on lookup.
        return self.resources[resource] if resource in self.resources else None  # noqa: SIM401

    @override
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        fault = self._take_fault(request)
        if fault is not None:
            return _status_response(fault.status, fault.reason, fault.message)
        if request.resource is not None and request.resource.plural:
            if request.action == kmock.action.CREATE and request.name is None:
                return await self._create(request)
            if request.name is not None and request.action == kmock.action.UPDATE:
                return await self._write(request, replace=False)
            if request.name is not None and request.method == kmock.method.PUT:
                return await self._write(request, replace=True)
            if request.name is not None and request.action == kmock.action.DELETE:
                return await self._delete(request)
        return await super()._handle(request)

    async def _create(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        assert resource is not None
        if not isinstance(request.data, dict):
            return _status_response(400, "BadRequest", "the request body must be a JSON object")
        obj: dict[str, Any] = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if request.namespace and meta.get("namespace") not in (None, request.namespace):
            return _status_response(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        namespace = request.namespace or meta.get("namespace")
        if resource == NAMESPACES:
            namespace = None
            meta.pop("namespace", None)
        if namespace is not None:
            meta["namespace"] = namespace
        info = self._info(resource)
        async with self._lock:
            ns_key = (NAMESPACES, None, namespace or "")
            if namespace is not None and (ns_key not in self.objects or self.objects[ns_key].deleted):
                return _status_response(
                    404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"}
                )
            if not meta.get("name"):
                if not meta.get("generateName"):
                    return _status_response(
                        422, "Invalid", "metadata.name: Required value: name or generateName is required"
                    )
                while True:  # a real API server retries name collisions the same way
                    name = meta["generateName"] + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
                    key = (resource, namespace, name)
                    if key not in self.objects or self.objects[key].deleted:
                        break
                meta["name"] = name
            key = (resource, namespace, meta["name"])
            if key in self.objects and not self.objects[key].deleted:
                return _status_response(
                    409,
                    "AlreadyExists",
                    f'{resource.plural} "{meta["name"]}" already exists',
                    {"name": meta["name"], "kind": resource.plural},
                )
            if info is not None and "status" in info.subresources:
                obj.pop("status", None)  # ignored on create when status is a subresource
            if resource == NAMESPACES:
                _namespace_defaults(obj)
            if info is not None and info.kind:
                obj.setdefault("kind", info.kind)
                obj.setdefault("apiVersion", f"{resource.group}/{resource.version}".lstrip("/"))
            meta.pop("deletionTimestamp", None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_revision())
            if resource.group:  # custom resources always have a generation; core Events, Namespaces don't
                meta["generation"] = 1
            if key in self.objects:
                self.objects[key].create(obj)
            else:
                self.objects[key] = obj
            await self._buses[resource].put({"type": "ADDED", "object": copy.deepcopy(obj)})
        return aiohttp.web.json_response(obj, status=201)

    async def _write(self, request: kmock.Request, *, replace: bool) -> aiohttp.web.StreamResponse:
        resource = request.resource
        assert resource is not None and request.name is not None
        if request.subresource not in (None, "status"):
            return _status_response(404, "NotFound", f"subresource {request.subresource!r} is not served")
        info = self._info(resource)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        key = (resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return _object_not_found(resource, request.name)
            old: dict[str, Any] = copy.deepcopy(self.objects[key].raw)
            old_meta = old.setdefault("metadata", {})
            data = request.data
            try:
                if replace or content_type in MERGE_PATCH_TYPES:
                    if not isinstance(data, dict):
                        raise _PatchError(400, "BadRequest", "the request body must be a JSON object")
                    wanted_rv = (data.get("metadata") or {}).get("resourceVersion")
                    if replace and not wanted_rv:
                        raise _PatchError(
                            422,
                            "Invalid",
                            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                        )
                    if wanted_rv and wanted_rv != old_meta.get("resourceVersion"):
                        raise _PatchError(
                            409,
                            "Conflict",
                            f"Operation cannot be fulfilled on {resource.plural} "
                            f'"{request.name}": the object has been modified; '
                            "please apply your changes to the latest version "
                            "and try again",
                        )
                    new = copy.deepcopy(data) if replace else merge_patch(old, data)
                elif content_type == JSON_PATCH_TYPE:
                    new = json_patch(old, data)
                else:
                    raise _PatchError(415, "UnsupportedMediaType", f"unsupported patch type: {content_type}")
                if not isinstance(new, dict):
                    raise _PatchError(422, "Invalid", "the patched object is not a JSON object")
            except _PatchError as exc:
                return _status_response(exc.status, exc.reason, exc.message)

            new = self._enforce(info, request.subresource, old, new)
            if new == old:  # a no-op write is not stored and emits no watch event
                return aiohttp.web.json_response(old)
            new["metadata"]["resourceVersion"] = self._next_revision()
            self.objects[key].create(new)
            await self._buses[resource].put({"type": "MODIFIED", "object": copy.deepcopy(new)})
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                await self._erase(key, new)
        return aiohttp.web.json_response(new)

    def _enforce(
        self, info: kmock.ResourceInfo | None, subresource: str | None, old: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply what a real API server keeps out of a client's hands on an update."""
        has_status = info is not None and "status" in info.subresources
        if subresource == "status":
            result = copy.deepcopy(old)  # /status writes change nothing but status
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            new = result
        elif has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])  # main-resource writes ignore status
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for name in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if name in old_meta:
                meta[name] = old_meta[name]
            else:
                meta.pop(name, None)
        for name in ("apiVersion", "kind"):
            if name in old:
                new[name] = old[name]
        if "generation" in old_meta and _spec_view(new) != _spec_view(old):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        return new

    async def _delete(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        assert resource is not None and request.name is not None
        key = (resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return _object_not_found(resource, request.name)
            obj: dict[str, Any] = copy.deepcopy(self.objects[key].raw)
            meta = obj.setdefault("metadata", {})
            if meta.get("deletionTimestamp"):
                return aiohttp.web.json_response(obj)  # already being deleted: nothing changes
            if meta.get("finalizers"):
                meta.update(
                    deletionTimestamp=_now(), deletionGracePeriodSeconds=0, resourceVersion=self._next_revision()
                )
                if "generation" in meta:  # a real API server bumps it when deletion starts
                    meta["generation"] = int(meta["generation"]) + 1
                self.objects[key].create(obj)
                await self._buses[resource].put({"type": "MODIFIED", "object": copy.deepcopy(obj)})
                return aiohttp.web.json_response(obj)
            await self._erase(key, obj)
        return aiohttp.web.json_response(obj)

    async def _erase(self, key: tuple[kmock.resource, str | None, str], obj: dict[str, Any]) -> None:
        # The DELETED event carries a fresh resourceVersion, as from a real API server.
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_revision()
        self.objects[key].create(final)
        self.objects[key].delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": copy.deepcopy(final)})

    @override
    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock repeats shortNames/categories/verbs on "plural/status" entries; kubectl then warns.
        result = await super()._serve_version(request)
        assert isinstance(result, dict)
        for entry in result.get("resources", []):
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return result

    @override
    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        result = await super()._serve_list(request)
        assert isinstance(result, dict) and request.resource is not None
        items: list[dict[str, Any]] = result["items"]
        if request.resource == EVENTS_V1:  # one store behind both Event APIs, as in a real cluster
            async with self._lock:
                items = items + [
                    _as_events_v1(obj.raw)
                    for (res, ns, _), obj in self.objects.items()
                    if res == CORE_EVENTS and not obj.deleted and request.namespace in (None, ns)
                ]
        info = self._info(request.resource)
        kind = info.kind if info is not None and info.kind else (request.resource.plural or "").capitalize()
        group_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        listing = {
            "apiVersion": group_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }
        if _wants_table(request):
            return self._table(request.resource, items)
        return listing

    @override
    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        result = await super()._serve_fetch(request)
        if _wants_table(request) and isinstance(result, dict) and request.resource is not None:
            return self._table(request.resource, [result])
        return result

    def _table(self, resource: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A meta.k8s.io/v1 Table, so that ``kubectl get`` prints the CRD's printer columns."""
        events = resource in (CORE_EVENTS, EVENTS_V1)
        columns = EVENT_COLUMNS if events else self.printer_columns.get(resource) or DEFAULT_COLUMNS
        rows = []
        for item in items:
            obj = _as_core_event(item) if resource == EVENTS_V1 else item
            cells: list[Any] = [item.get("metadata", {}).get("name")]
            if events:
                seen = obj.get("lastTimestamp") or obj.get("eventTime") or obj["metadata"].get("creationTimestamp")
                cells += [
                    human_age(seen) if seen else None,
                    obj.get("type"),
                    obj.get("reason"),
                    _event_object(obj),
                    obj.get("message"),
                ]
            for column in [] if events else columns:
                values = jsonpath_values(obj, column["jsonPath"])
                value = next((v for v in values if v not in (None, "")), None)
                if column.get("type") == "date" and isinstance(value, str):
                    value = human_age(value)
                cells.append(value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadata",
                        "metadata": item.get("metadata", {}),
                    },
                }
            )
        definitions = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        ]
        definitions += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": str(self._revision)},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    @override
    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        # Wraps kmock's endless stream so that it ends on timeoutSeconds or on drop_watches().
        if self._watch_drop is None:
            self._watch_drop = asyncio.Event()
        dropped = self._watch_drop
        timeout_text = request.params.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout_text) if timeout_text else None
        inner = cast(AsyncGenerator[kmock.Payload, None], super()._serve_watch(request))
        finished = object()

        async def next_item() -> Any:
            try:
                return await anext(inner)
            except StopAsyncIteration:
                return finished

        drop_task = asyncio.ensure_future(dropped.wait())
        item_task: asyncio.Future[Any] | None = None
        self.active_watches += 1
        try:
            while not self._closing:
                item_task = asyncio.ensure_future(next_item())
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    {item_task, drop_task}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if self.stalled and item_task not in done:
                    continue  # a stalled server does not end the stream when asked to
                if item_task not in done or item_task.result() is finished:
                    return
                item, item_task = item_task.result(), None
                if self.stalled:
                    continue  # swallowed: the client never hears of it on this stream
                yield item
        finally:
            # The inner generator may still be running in item_task: stop that before closing it.
            self.active_watches -= 1
            tasks = [task for task in (item_task, drop_task) if task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await inner.aclose()


class _Server(kmock.Server):
    """``kmock.Server`` minus its DNS interceptor and client session.

    The interceptor patches aiohttp's resolver process-wide and raises unless servers stop in
    the reverse order of starting; clients reach the emulator by IP anyway.
    """

    async def __aenter__(self) -> Self:
        self._managed_server = self._server_cls(self.handler, host=self._host, port=self._port)
        await self._managed_server.__aenter__()
        self.handler.servers.append(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.handler.servers.remove(self)
        server, self._managed_server = self._managed_server, None
        if server is not None:
            await server.__aexit__(exc_type, exc, tb)


def load_bundled_resources(emulator: kmock.KubernetesEmulator) -> None:
    """``resources.load_bundled()`` without its deprecated ``read_binary`` (a warning is an error here)."""
    data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    emulator.resources.load_data(gzip.decompress(data))


def _resource_path(
    resource: str | kmock.resource, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    res = resource if isinstance(resource, kmock.resource) else kmock.resource(resource)
    if res.version is None or res.plural is None:
        raise ValueError(f"resource must be 'group/version/plural' or 'v1/plural': {resource!r}")
    path = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    if namespace is not None:
        path += f"/namespaces/{urllib.parse.quote(namespace)}"
    path += f"/{res.plural}"
    if name is not None:
        path += f"/{urllib.parse.quote(name)}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class KubeEmulator(Service):
    """Runs ``ApiServerEmulator`` + ``kmock.Server`` on 127.0.0.1 in a thread with its own loop.

    The ``create``/``patch``/``delete``/``get`` helpers are real HTTP requests (so watchers see
    the same events as for any client) marked to bypass injected faults.
    """

    def __init__(self, *, port: int | None = None, namespaces: tuple[str, ...] = DEFAULT_NAMESPACES) -> None:
        self._port = port
        self._initial_namespaces = namespaces
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._url: str | None = None
        self._emulator: ApiServerEmulator | None = None
        # Never route the harness's own requests through an environment-configured proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10) -> Self:
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the Kubernetes emulator did not start in time")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        return self

    def stop(self, timeout: float = 10) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("the Kubernetes emulator did not stop in time")
        self._thread = None
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed") from self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        emulator = ApiServerEmulator()
        load_bundled_resources(emulator)
        for namespace in self._initial_namespaces:
            emulator.ensure_namespace(namespace)
        async with emulator, _Server(emulator, host="127.0.0.1", port=self._port) as server:
            self._emulator = emulator
            self._url = f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stopping.wait()
            await emulator.drop_watches(closing=True)

    # -- access ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not started")
        return self._url

    @property
    def emulator(self) -> ApiServerEmulator:
        """The kmock emulator itself; touch it only via ``call()`` (it belongs to another thread)."""
        if self._emulator is None:
            raise RuntimeError("the emulator is not started")
        return self._emulator

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run a plain function on the emulator's loop thread and return its result."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout=timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the emulator's loop thread and return its result."""
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise RuntimeError("the emulator is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def write_kubeconfig(self, path: str | Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig (plain http, no auth, context ``kmock``) for kubectl, kopf, kubernetes."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
            "current-context": "kmock",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def load_crd(self, path: str | Path, *, store: bool = True) -> list[str]:
        """Register every served version of the CRD(s) in a YAML file; return 'group/version/plural' keys."""
        docs = [
            doc
            for doc in yaml.safe_load_all(Path(path).read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
        ]
        if not docs:
            raise ValueError(f"no CustomResourceDefinition in {path}")
        keys: list[str] = []
        for crd in docs:
            spec, names = crd["spec"], crd["spec"]["names"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                key = f"{spec['group']}/{version['name']}/{names['plural']}"
                info = kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular", names["kind"].lower()),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    verbs=set(STANDARD_VERBS),
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=set((version.get("subresources") or {}).keys()),
                )
                columns = list(version.get("additionalPrinterColumns") or DEFAULT_COLUMNS)
                self.call(functools.partial(self._register, key, info, columns))
                keys.append(key)
        if store:  # so that `kubectl get crd` and anything listing CRDs sees them too
            for crd in docs:
                existing = self.get(CRD_RESOURCE, None, crd["metadata"]["name"])
                if existing is None:
                    self.create(CRD_RESOURCE, None, crd)
        return keys

    def _register(self, key: str, info: kmock.ResourceInfo, columns: list[dict[str, Any]]) -> None:
        self.emulator.resources[key] = info
        self.emulator.printer_columns[kmock.resource(key)] = columns

    # -- thread-safe helpers (real HTTP requests, immune to injected faults) -------------------

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json", timeout: float = 10
    ) -> tuple[int, Any]:
        """Send one request to the emulator; return (status, decoded JSON or None)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {HARNESS_HEADER: "1", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method.upper(), headers=headers)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            try:
                status, raw = exc.code, exc.read()
            finally:
                exc.close()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def _checked(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Any:
        status, payload = self.request(method, path, body, content_type=content_type)
        if missing_ok and status == 404:
            return None
        if status >= 300:
            raise KubeApiError(status, payload)
        return payload

    def create_namespace(self, name: str, *, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Create a Namespace (objects can only be created in existing ones); idempotent."""
        existing = self.get("v1/namespaces", None, name)
        if existing is not None:
            return existing
        return self.create("v1/namespaces", None, {"metadata": {"name": name, "labels": dict(labels or {})}})

    def create(self, resource: str, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST an object (``generateName`` works); return the stored object."""
        result: dict[str, Any] = self._checked("POST", _resource_path(resource, namespace), dict(body))
        return result

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any] | list[Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch (a dict) or JSON-patch (a list) an object; ``subresource='status'`` for status."""
        content_type = JSON_PATCH_TYPE if isinstance(patch, list) else "application/merge-patch+json"
        body = list(patch) if isinstance(patch, list) else dict(patch)
        result: dict[str, Any] = self._checked(
            "PATCH", _resource_path(resource, namespace, name, subresource), body, content_type=content_type
        )
        return result

    def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """DELETE an object; return its last state, or None if it did not exist."""
        result: dict[str, Any] | None = self._checked(
            "DELETE", _resource_path(resource, namespace, name), missing_ok=True
        )
        return result

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._checked("GET", _resource_path(resource, namespace, name), missing_ok=True)
        return result

    def list_objects(self, resource: str | None = None) -> list[dict[str, Any]]:
        """Every live object the emulator holds (of one resource, or of all), as deep copies."""
        wanted = None if resource is None else kmock.resource(resource)

        def collect() -> list[dict[str, Any]]:
            return [
                copy.deepcopy(obj.raw)
                for (res, _, _), obj in self.emulator.objects.items()
                if not obj.deleted and (wanted is None or res == wanted)
            ]

        return self.call(collect)

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Core v1 Events, optionally of one namespace, oldest first."""
        return [
            event
            for event in self.list_objects("v1/events")
            if namespace is None or event.get("metadata", {}).get("namespace") == namespace
        ]

    # -- fault injection -----------------------------------------------------------------------

    def fail_requests(
        self,
        method: str | None,
        path: str | re.Pattern[str],
        *,
        status: int = 500,
        times: int | None = 1,
        reason: str | None = None,
        message: str | None = None,
    ) -> Fault:
        """Answer the next ``times`` matching requests (None: all) with a Kubernetes Status error."""
        return self.emulator.add_fault(method, path, status=status, times=times, reason=reason, message=message)

    def fail_status_patches(self, times: int | None = 1, *, status: int = 409) -> Fault:
        """Make the next ``times`` PATCH requests to any ``/status`` subresource fail (409 by default)."""
        return self.fail_requests("PATCH", r"/status$", status=status, times=times)

    def clear_faults(self) -> None:
        self.emulator.clear_faults()

    def drop_watches(self) -> int:
        """End all open watch streams now (clients must re-list and re-watch); return how many."""
        return self.run(self.emulator.drop_watches())

    @property
    def active_watches(self) -> int:
        return self.emulator.active_watches

    def stall_watches(self, stalled: bool = True) -> None:
        """Make open and new watch streams go silent (no events, no server-side timeout), or resume."""
        self.emulator.stalled = stalled
