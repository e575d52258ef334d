"""Client for the connector-credentials socket API (standard library only).

The operator runs as a sidecar and serves secret values over HTTP/1.1 on a Unix domain
socket. This module is what the controller imports to read them::

    from connector_credentials.client import CredentialClient

    with CredentialClient() as client:
        credential = client.get("default", "db-password")
        connect(password=credential.value)

:class:`CredentialClient` is synchronous and thread-safe; :class:`AsyncCredentialClient`
is its asyncio twin. Both keep connections alive and reuse them, and both turn every
answer into a :class:`Credential`, a list of :class:`CredentialInfo`, or a
:class:`CredentialError` subclass through the same parsing code.

A :class:`Credential` never shows its value: ``repr``, ``str`` and ``format`` mask it,
it is not a dataclass (``dataclasses.asdict`` refuses it), it has no ``__dict__`` (so
``vars`` refuses it), and it refuses to be pickled. The value is only ever read through
the ``value`` attribute or :meth:`Credential.as_bytes`.

This module must not import anything outside the standard library: the controller
installs it without the operator's dependencies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import email.utils
import hmac
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, Self
from urllib.parse import quote

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MASK",
    "SOCKET_PATH_ENV",
    "AsyncCredentialClient",
    "Credential",
    "CredentialClient",
    "CredentialError",
    "CredentialInfo",
    "CredentialNotFound",
    "CredentialTimeout",
    "CredentialUnavailable",
    "Encoding",
    "PermissionDenied",
    "ProtocolError",
    "ServerUnreachable",
    "parse_retry_after",
    "parse_rfc3339",
    "resolve_socket_path",
]

log = logging.getLogger(__name__)

SOCKET_PATH_ENV: Final = "CCRED_SOCKET_PATH"
DEFAULT_SOCKET_PATH: Final = "/var/run/connector-credentials/credentials.sock"
MASK: Final = "***"
DEFAULT_TIMEOUT: Final = 5.0

Encoding = Literal["text", "base64"]

#: Largest response body accepted (a secret is at most 64 KiB; lists can be longer).
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_MAX_HEADER_LINES: Final = 100
_MAX_LINE_BYTES: Final = 64 * 1024
#: Idle keep-alive connections kept per client; more may be open while requests overlap.
_MAX_IDLE: Final = 4

_USER_AGENT: Final = "connector-credentials-client/0.1"
_REQUEST_HEADERS: Final = {
    "Host": "localhost",
    "Accept": "application/json",
    "User-Agent": _USER_AGENT,
}

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


# --------------------------------------------------------------------------- values


class Credential:
    """One credential's value and metadata, as ``GET /v1/credentials/{ns}/{name}`` returns it.

    Immutable. ``value`` is the text the server sent: the secret itself for
    ``encoding == "text"``, its base64 form for ``encoding == "base64"`` (binary
    secrets); :attr:`bytes_value` / :meth:`as_bytes` give the raw bytes either way.
    ``repr``/``str``/``format`` show ``value='***'``.
    """

    __slots__ = ("_arn", "_bytes", "_encoding", "_fetched_at", "_name", "_namespace", "_value", "_version_id")

    _namespace: str
    _name: str
    _value: str
    _encoding: Encoding
    _version_id: str
    _arn: str
    _fetched_at: datetime
    _bytes: bytes | None

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        value: str,
        encoding: Encoding = "text",
        version_id: str,
        arn: str,
        fetched_at: datetime,
    ) -> None:
        if encoding == "base64":
            decoded: bytes | None = _b64decode(value)
            if decoded is None:
                # Raised outside the decoder's ``except`` so that no exception context keeps the value.
                raise ValueError("the value is not valid base64")
        elif encoding == "text":
            decoded = None
        else:
            raise ValueError(f"unknown encoding {encoding!r}; expected 'text' or 'base64'")
        for attr, item in (
            ("_namespace", namespace),
            ("_name", name),
            ("_value", value),
            ("_encoding", encoding),
            ("_version_id", version_id),
            ("_arn", arn),
            ("_fetched_at", fetched_at),
            ("_bytes", decoded),
        ):
            object.__setattr__(self, attr, item)

    # Read-only properties (rather than plain attributes) so that type checkers see the immutability.

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> str:
        """The secret as sent: the text itself, or base64 text when :attr:`encoding` is ``"base64"``."""
        return self._value

    @property
    def encoding(self) -> Encoding:
        return self._encoding

    @property
    def version_id(self) -> str:
        return self._version_id

    @property
    def arn(self) -> str:
        return self._arn

    @property
    def fetched_at(self) -> datetime:
        return self._fetched_at

    @property
    def bytes_value(self) -> bytes:
        """The raw secret: base64-decoded for binary secrets, UTF-8 bytes for text ones."""
        if self._bytes is not None:
            return self._bytes
        return self.value.encode("utf-8")

    def as_bytes(self) -> bytes:
        """Same as :attr:`bytes_value`."""
        return self.bytes_value

    @property
    def is_binary(self) -> bool:
        return self.encoding == "base64"

    def __repr__(self) -> str:
        return (
            f"Credential(namespace={self.namespace!r}, name={self.name!r}, value={MASK!r}, "
            f"encoding={self.encoding!r}, version_id={self.version_id!r}, arn={self.arn!r}, "
            f"fetched_at={self.fetched_at.isoformat()!r})"
        )

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __setattr__(self, attr: str, item: object) -> NoReturn:
        raise AttributeError(f"Credential is immutable; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> NoReturn:
        raise AttributeError(f"Credential is immutable; cannot delete {attr!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credential):
            return NotImplemented
        return (
            self.namespace,
            self.name,
            self.encoding,
            self.version_id,
            self.arn,
            self.fetched_at,
        ) == (
            other.namespace,
            other.name,
            other.encoding,
            other.version_id,
            other.arn,
            other.fetched_at,
        ) and hmac.compare_digest(self.value.encode("utf-8"), other.value.encode("utf-8"))

    def __hash__(self) -> int:
        # Deliberately not the value: equal credentials still hash equally.
        return hash((self.namespace, self.name, self.version_id, self.arn, self.fetched_at))

    # Pickling would write the value wherever the pickle goes (caches, task queues, logs).
    def __reduce__(self) -> NoReturn:
        raise TypeError("Credential objects are not picklable (they hold a secret value)")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("Credential objects are not picklable (they hold a secret value)")

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """One entry of ``GET /v1/credentials``: a credential's state, never its value."""

    namespace: str
    name: str
    ready: bool
    arn: str | None = None
    reason: str | None = None
    message: str | None = None
    version_id: str | None = None
    fetched_at: datetime | None = None


# --------------------------------------------------------------------------- errors


class CredentialError(Exception):
    """Base class of every error this client raises (apart from ``ValueError`` for bad names).

    ``reason`` is the server's machine-readable reason (``NotFound``, ``AccessDenied``,
    ``Throttled``, ...) or, for errors found on this side, the class's own reason.
    ``message`` is the server's human-readable message; ``status`` the HTTP status, or
    ``None`` when no response arrived. None of them ever contains a secret value.
    """

    default_reason: str = "Error"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.status = status

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} [{self.reason}, HTTP {self.status}]"


class CredentialNotFound(CredentialError):
    """404: no ConnectorCredential of that namespace and name is declared."""

    default_reason = "NotFound"


class CredentialUnavailable(CredentialError):
    """502 (AWS refused: ``transient`` is False) or 503 (not resolved yet / transient failure).

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    default_reason = "Unavailable"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, status=status)
        self.retry_after = retry_after
        self.transient = status == 503


class PermissionDenied(CredentialError):
    """403: this process's uid may not read credentials from the socket."""

    default_reason = "Forbidden"


class ProtocolError(CredentialError):
    """The server's answer was malformed or not what the socket API promises."""

    default_reason = "ProtocolError"


class ServerUnreachable(CredentialError):
    """The socket is missing, refuses connections, or dropped the connection mid-request."""

    default_reason = "ServerUnreachable"

    def __init__(self, message: str, *, socket_path: str = "", reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.socket_path = socket_path


class CredentialTimeout(CredentialError, TimeoutError):
    """No complete answer arrived within the client's timeout."""

    default_reason = "Timeout"


# --------------------------------------------------------------------------- shared logic


def resolve_socket_path(socket_path: str | os.PathLike[str] | None = None) -> str:
    """The socket to use: the argument, else ``$CCRED_SOCKET_PATH``, else the default."""
    if socket_path is not None:
        return os.fspath(socket_path)
    return os.environ.get(SOCKET_PATH_ENV) or DEFAULT_SOCKET_PATH


def _check_name(kind: str, text: object, pattern: re.Pattern[str], limit: int, rule: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{kind} must be a str, not {type(text).__name__}")
    if len(text) > limit or not pattern.fullmatch(text):
        raise ValueError(
            f"{kind} {text[:300]!r} is not a valid Kubernetes name: it must be a {rule} "
            f"(at most {limit} characters: lowercase letters, digits, {_rule_chars(pattern)})"
        )


def _rule_chars(pattern: re.Pattern[str]) -> str:
    if pattern is _DNS1123_SUBDOMAIN:
        return "'-' and '.', each dot-separated part starting and ending with a letter or digit"
    return "and '-', starting and ending with a letter or digit"


def credential_path(namespace: str, name: str, *, refresh: bool = False) -> str:
    """The request target for one credential, after checking both names."""
    _check_name("namespace", namespace, _DNS1123_LABEL, 63, "DNS-1123 label")
    _check_name("name", name, _DNS1123_SUBDOMAIN, 253, "DNS-1123 subdomain")
    target = f"/v1/credentials/{quote(namespace, safe='')}/{quote(name, safe='')}"
    return target + "?refresh=true" if refresh else target


@dataclass(frozen=True, slots=True)
class _Response:
    """A complete HTTP response, transport-independent. ``headers`` keys are lowercase."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""

    def __repr__(self) -> str:
        # The body may hold a secret value.
        return f"_Response(status={self.status}, body=<{len(self.body)} bytes>)"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None if absent/unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp into an aware datetime (fractions beyond microseconds dropped)."""
    parsed = _rfc3339_or_none(text)
    if parsed is None:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 timestamp")
    return parsed


def _rfc3339_or_none(text: str) -> datetime | None:
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
        tz = UTC if zulu else timezone(-offset if sign == "-" else offset)
        # A leap second (:60) is clamped: datetime cannot represent it.
        return datetime(int(year), int(month), int(day), int(hour), int(minute), min(int(second), 59), micro, tzinfo=tz)
    except ValueError:  # month 13, offset of 24h or more, ...
        return None


_INVALID: Final = object()


def _loads(body: bytes) -> Any:
    """``json.loads``, or ``_INVALID``; the decoder's exception (which keeps the body) never escapes."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _INVALID


def _decode_json(response: _Response, what: str) -> Any:
    document = _loads(response.body)
    if document is _INVALID:
        # Raised outside the ``except``: not even ``__context__`` may keep the body (maybe a value).
        raise ProtocolError(
            f"the server's answer to {what} (HTTP {response.status}) is not valid JSON", status=response.status
        )
    return document


def _field(document: Mapping[str, Any], key: str, kind: type, what: str, status: int, *, optional: bool = False) -> Any:
    item = document.get(key)
    if item is None and optional:
        return None
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        expected = {str: "a string", bool: "a boolean"}.get(kind, kind.__name__)
        state = "missing" if key not in document else f"not {expected}"
        raise ProtocolError(f"the server's answer to {what}: field {key!r} is {state}", status=status)
    return item


def _time_field(
    document: Mapping[str, Any], key: str, what: str, status: int, *, optional: bool = False
) -> datetime | None:
    text = _field(document, key, str, what, status, optional=optional)
    if text is None:
        return None
    parsed = _rfc3339_or_none(text)
    if parsed is None:
        shown = repr(text[:64])
        raise ProtocolError(
            f"the server's answer to {what}: field {key!r} is not an RFC 3339 timestamp ({shown})", status=status
        )
    return parsed


def raise_for_error(response: _Response, what: str) -> None:
    """Raise the :class:`CredentialError` a non-2xx response stands for; return on 2xx."""
    status = response.status
    if 200 <= status < 300:
        return
    document = _decode_json(response, what)
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        raise ProtocolError(f"the server's HTTP {status} answer to {what} has no 'error' object", status=status)
    reason = _field(error, "reason", str, what, status)
    message = _field(error, "message", str, what, status)
    if status == 404:
        raise CredentialNotFound(message, reason=reason, status=status)
    if status == 403:
        raise PermissionDenied(message, reason=reason, status=status)
    if status in (502, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise CredentialUnavailable(message, reason=reason, status=status, retry_after=retry_after)
    raise CredentialError(message, reason=reason, status=status)


def parse_credential(response: _Response, namespace: str, name: str) -> Credential:
    """Turn the answer to ``GET /v1/credentials/{namespace}/{name}`` into a :class:`Credential`."""
    what = f"GET credential {namespace}/{name}"
    raise_for_error(response, what)
    status = response.status
    if status != 200:
        raise ProtocolError(f"unexpected HTTP {status} answer to {what}", status=status)
    document = _decode_json(response, what)
    if not isinstance(document, dict):
        raise ProtocolError(f"the server's answer to {what} is not a JSON object", status=status)
    raw_encoding = document.get("encoding")
    encoding: Encoding
    if raw_encoding is None or raw_encoding == "text":
        encoding = "text"
    elif raw_encoding == "base64":
        encoding = "base64"
    else:
        shown = repr(raw_encoding)[:40] if isinstance(raw_encoding, str) else type(raw_encoding).__name__
        raise ProtocolError(f"the server's answer to {what} has unknown encoding {shown}", status=status)
    value = _field(document, "value", str, what, status)
    version_id = _field(document, "versionId", str, what, status)
    arn = _field(document, "arn", str, what, status)
    fetched_at = _time_field(document, "fetchedAt", what, status)
    assert fetched_at is not None
    if encoding == "base64" and _b64decode(value) is None:
        raise ProtocolError(f"the server's answer to {what}: the value is not valid base64", status=status)
    return Credential(
        namespace=namespace,
        name=name,
        value=value,
        encoding=encoding,
        version_id=version_id,
        arn=arn,
        fetched_at=fetched_at,
    )


def parse_credential_list(response: _Response) -> builtins.list[CredentialInfo]:
    """Turn the answer to ``GET /v1/credentials`` into :class:`CredentialInfo` entries."""
    what = "GET /v1/credentials"
    raise_for_error(response, what)
    status = response.status
    if status != 200:
        raise ProtocolError(f"unexpected HTTP {status} answer to {what}", status=status)
    document = _decode_json(response, what)
    entries = document.get("credentials") if isinstance(document, dict) else None
    if not isinstance(entries, builtins.list):
        raise ProtocolError(f"the server's answer to {what} has no 'credentials' list", status=status)
    infos: builtins.list[CredentialInfo] = []
    for index, entry in enumerate(entries):
        where = f"{what} (entry {index})"
        if not isinstance(entry, dict):
            raise ProtocolError(f"the server's answer to {where} is not a JSON object", status=status)
        infos.append(
            CredentialInfo(
                namespace=_field(entry, "namespace", str, where, status),
                name=_field(entry, "name", str, where, status),
                ready=_field(entry, "ready", bool, where, status),
                arn=_field(entry, "arn", str, where, status, optional=True),
                reason=_field(entry, "reason", str, where, status, optional=True),
                message=_field(entry, "message", str, where, status, optional=True),
                version_id=_field(entry, "versionId", str, where, status, optional=True),
                fetched_at=_time_field(entry, "fetchedAt", where, status, optional=True),
            )
        )
    return infos


def parse_health(response: _Response) -> bool:
    """True only for ``200 {"status": "ok"}``; anything else means not healthy."""
    if response.status != 200:
        return False
    document = _loads(response.body)
    return isinstance(document, dict) and document.get("status") == "ok"


def _unreachable(socket_path: str, exc: BaseException) -> ServerUnreachable:
    if isinstance(exc, FileNotFoundError):
        problem = "does not exist"
    elif isinstance(exc, ConnectionRefusedError):
        problem = "refuses connections"
    elif isinstance(exc, PermissionError):
        return ServerUnreachable(
            f"permission denied on the credentials socket {socket_path}: this process's uid/gid may not "
            "open it; run the controller with the group the operator's socket mode allows (e.g. a shared "
            "fsGroup) and a uid in the operator's allowed uids",
            socket_path=socket_path,
        )
    else:
        problem = f"cannot be connected to ({exc.__class__.__name__}: {exc})"
    return ServerUnreachable(
        f"the credentials socket {socket_path} {problem}: the connector-credentials operator sidecar may not "
        "be running (or not ready yet), or the socket volume may not be shared with this container "
        f"(set {SOCKET_PATH_ENV} if the socket lives elsewhere)",
        socket_path=socket_path,
    )


def _dropped(socket_path: str) -> ServerUnreachable:
    return ServerUnreachable(
        f"the connector-credentials operator closed the connection on {socket_path} before answering; "
        "the sidecar may be restarting",
        socket_path=socket_path,
    )


def _timed_out(socket_path: str, timeout: float | None) -> CredentialTimeout:
    return CredentialTimeout(f"no answer from the connector-credentials operator on {socket_path} within {timeout}s")


def _closed_client() -> RuntimeError:
    return RuntimeError("the credential client is closed")


# --------------------------------------------------------------------------- sync client


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else DEFAULT_TIMEOUT)
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            except TimeoutError:
                sock.close()
                raise _timed_out(self.socket_path, self.timeout) from None
            except BlockingIOError:
                # A full listen backlog fails a Unix connect at once (EAGAIN): wait, not give up.
                sock.close()
                if time.monotonic() + delay > deadline:
                    raise _timed_out(self.socket_path, self.timeout) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            except OSError as exc:
                sock.close()
                raise _unreachable(self.socket_path, exc) from exc
            self.sock = sock
            return


class CredentialClient:
    """Synchronous, thread-safe client of the credentials socket.

    Connections are kept alive and reused (a few idle ones at most; threads that overlap
    get their own). A reused connection the server has meanwhile closed is replaced
    transparently, once.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: builtins.list[_UnixHTTPConnection] = []
        self._closed = False

    # -- public API

    def get(self, namespace: str, name: str, refresh: bool = False) -> Credential:
        """The credential's value; ``refresh=True`` makes the operator fetch it from AWS now."""
        target = credential_path(namespace, name, refresh=refresh)
        return parse_credential(self._request(target), namespace, name)

    def list(self) -> builtins.list[CredentialInfo]:
        """Every credential the operator serves, with its state (never values)."""
        return parse_credential_list(self._request("/v1/credentials"))

    def healthy(self) -> bool:
        """Whether the operator answers ``/healthz`` with ``ok``; never raises :class:`CredentialError`."""
        try:
            return parse_health(self._request("/healthz"))
        except CredentialError as exc:
            log.debug("credentials socket health check failed: %s", exc)
            return False

    def close(self) -> None:
        """Close idle connections; requests in flight finish and close theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CredentialClient(socket_path={self.socket_path!r}, timeout={self.timeout!r})"

    # -- transport

    def _acquire(self, *, fresh: bool) -> tuple[_UnixHTTPConnection, bool]:
        with self._lock:
            if self._closed:
                raise _closed_client()
            if self._idle and not fresh:
                return self._idle.pop(), True
        return _UnixHTTPConnection(self.socket_path, self.timeout), False

    def _release(self, conn: _UnixHTTPConnection) -> None:
        if conn.sock is not None:
            with self._lock:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def _request(self, target: str) -> _Response:
        for attempt in (1, 2):
            # A retry always uses a new connection: the other idle ones may be just as stale.
            conn, reused = self._acquire(fresh=attempt == 2)
            try:
                conn.request("GET", target, headers=_REQUEST_HEADERS)
                raw = conn.getresponse()
                _check_length(raw.length)
                body = raw.read()
                response = _Response(
                    status=raw.status,
                    headers={key.lower(): item for key, item in raw.getheaders()},
                    body=body,
                )
            except CredentialError:
                conn.close()
                raise
            except TimeoutError:
                conn.close()
                raise _timed_out(self.socket_path, self.timeout) from None
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # Nothing of an answer arrived: the server closed an idle connection, or died.
                conn.close()
                if reused and attempt == 1:
                    log.debug("keep-alive connection to %s was closed by the server; reconnecting", self.socket_path)
                    continue
                raise _dropped(self.socket_path) from None
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                failure = exc.__class__.__name__
            except BaseException:
                conn.close()
                raise
            else:
                self._release(conn)
                return response
            # Raised outside the ``except``: an IncompleteRead keeps the partial body (maybe a value).
            raise ProtocolError(f"malformed HTTP answer from {self.socket_path} ({failure})")
        raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- async client


class _ConnectionDropped(Exception):
    """The server closed the connection before any byte of an answer."""


class _AsyncConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and self.reader.exception() is None

    def abort(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, RuntimeError):  # already reset, or the loop is going away
            pass

    async def exchange(self, target: str) -> tuple[_Response, bool]:
        """Send a GET and read the whole answer; returns it and whether to keep the connection."""
        lines = [f"GET {target} HTTP/1.1"]
        lines += [f"{key}: {item}" for key, item in _REQUEST_HEADERS.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        try:
            await self.writer.drain()
            status_line = await self._readline()
        except (BrokenPipeError, ConnectionResetError):
            raise _ConnectionDropped from None
        if not status_line:
            raise _ConnectionDropped
        try:
            return await self._read_answer(status_line)
        except asyncio.IncompleteReadError:
            failure = "the server closed the connection in the middle of an answer"
        except (ConnectionResetError, BrokenPipeError):
            failure = "the connection was reset in the middle of an answer"
        # Raised outside the ``except``: the partial answer (maybe a value) must not stay reachable as context.
        raise ProtocolError(failure)

    async def _read_answer(self, status_line: bytes) -> tuple[_Response, bool]:
        version, status, headers = self._parse_head(status_line, await self._read_headers())
        if status < 200:
            raise ProtocolError(f"unexpected informational HTTP {status} answer", status=status)
        keep_alive = version == "HTTP/1.1" and "close" not in _tokens(headers.get("connection", ""))
        transfer = _tokens(headers.get("transfer-encoding", ""))
        if status in (204, 304):
            body = b""
        elif transfer:
            if transfer[-1] != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {headers['transfer-encoding']!r}")
            body = await self._read_chunked()
        elif "content-length" in headers:
            length = _content_length(headers["content-length"])
            body = await self.reader.readexactly(length)
        else:
            # Neither length nor chunks: the body runs to the end of the connection.
            buffer = bytearray()
            while chunk := await self.reader.read(65536):
                buffer += chunk
                if len(buffer) > MAX_BODY_BYTES:
                    raise ProtocolError("the server's answer is too large")
            body = bytes(buffer)
            keep_alive = False
        return _Response(status=status, headers=headers, body=body), keep_alive

    async def _readline(self) -> bytes:
        try:
            return await self.reader.readline()
        except ValueError:  # the stream limit: a line longer than _MAX_LINE_BYTES
            raise ProtocolError("the server sent an over-long HTTP line") from None

    async def _read_headers(self) -> builtins.list[bytes]:
        lines: builtins.list[bytes] = []
        while True:
            line = await self._readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            if line in (b"\r\n", b"\n"):
                return lines
            if len(lines) >= _MAX_HEADER_LINES:
                raise ProtocolError("the server sent too many header lines")
            lines.append(line)

    @staticmethod
    def _parse_head(status_line: bytes, header_lines: builtins.list[bytes]) -> tuple[str, int, dict[str, str]]:
        version, _, rest = status_line.decode("latin-1").rstrip("\r\n").partition(" ")
        code = rest[:3]
        if (
            version not in ("HTTP/1.0", "HTTP/1.1")
            or not (len(code) == 3 and code.isascii() and code.isdigit())
            or rest[3:4] not in ("", " ")
        ):
            raise ProtocolError(f"malformed HTTP status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            key, sep, item = line.decode("latin-1").partition(":")
            key = key.strip().lower()
            if not sep or not key or key != key.strip() or " " in key:
                raise ProtocolError(f"malformed HTTP header line {line[:80]!r}", status=int(code))
            item = item.strip()
            if key in headers:
                if key == "content-length" and headers[key] != item:
                    raise ProtocolError("conflicting Content-Length headers", status=int(code))
                headers[key] = f"{headers[key]}, {item}" if key != "content-length" else item
            else:
                headers[key] = item
        return version, int(code), headers

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self._readline()
            if not size_line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(size_line, None)
            digits = size_line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(digits):
                raise ProtocolError("malformed chunk size in the server's answer")
            size = int(digits, 16)
            if len(body) + size > MAX_BODY_BYTES:
                raise ProtocolError("the server's answer is too large")
            if size == 0:
                await self._read_headers()  # trailers
                return bytes(body)
            body += await self.reader.readexactly(size)
            if await self.reader.readexactly(2) != b"\r\n":
                raise ProtocolError("malformed chunk in the server's answer")


def _check_length(length: int | None) -> None:
    if length is not None and length > MAX_BODY_BYTES:
        raise ProtocolError(f"the server's answer is too large ({length} bytes)")


def _tokens(header: str) -> builtins.list[str]:
    return [part.strip().lower() for part in header.split(",") if part.strip()]


def _content_length(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ProtocolError(f"malformed Content-Length {text[:40]!r}")
    length = int(text)
    _check_length(length)
    return length


class AsyncCredentialClient:
    """asyncio client of the credentials socket; same methods as :class:`CredentialClient`.

    Use it from one event loop. Connections are kept alive and reused (a few idle ones at
    most; overlapping requests open their own). A reused connection the server has
    meanwhile closed is replaced transparently, once. ``timeout`` bounds each attempt
    (connecting, sending and reading the whole answer).
    """

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._idle: builtins.list[_AsyncConnection] = []
        self._closed = False

    # -- public API

    async def get(self, namespace: str, name: str, refresh: bool = False) -> Credential:
        """The credential's value; ``refresh=True`` makes the operator fetch it from AWS now."""
        target = credential_path(namespace, name, refresh=refresh)
        return parse_credential(await self._request(target), namespace, name)

    async def list(self) -> builtins.list[CredentialInfo]:
        """Every credential the operator serves, with its state (never values)."""
        return parse_credential_list(await self._request("/v1/credentials"))

    async def healthy(self) -> bool:
        """Whether the operator answers ``/healthz`` with ``ok``; never raises :class:`CredentialError`."""
        try:
            return parse_health(await self._request("/healthz"))
        except CredentialError as exc:
            log.debug("credentials socket health check failed: %s", exc)
            return False

    async def aclose(self) -> None:
        """Close idle connections; requests in flight finish and close theirs."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncCredentialClient(socket_path={self.socket_path!r}, timeout={self.timeout!r})"

    # -- transport

    def _take_idle(self) -> _AsyncConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _AsyncConnection:
        delay = 0.005
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=_MAX_LINE_BYTES)
            except BlockingIOError:
                # A full listen backlog (EAGAIN): the request's timeout bounds the waiting.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    raise
                raise _unreachable(self.socket_path, exc) from exc
            return _AsyncConnection(reader, writer)

    async def _request(self, target: str) -> _Response:
        for attempt in (1, 2):
            if self._closed:
                raise _closed_client()
            # A retry always uses a new connection: the other idle ones may be just as stale.
            conn = self._take_idle() if attempt == 1 else None
            reused = conn is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await self._connect()
                    response, keep_alive = await conn.exchange(target)
            except TimeoutError:
                if conn is not None:
                    conn.abort()
                raise _timed_out(self.socket_path, self.timeout) from None
            except _ConnectionDropped:
                assert conn is not None
                conn.abort()
                if reused and attempt == 1:
                    log.debug("keep-alive connection to %s was closed by the server; reconnecting", self.socket_path)
                    continue
                raise _dropped(self.socket_path) from None
            except CredentialError:
                if conn is not None:
                    conn.abort()
                raise
            except OSError as exc:
                if conn is not None:
                    conn.abort()
                raise ProtocolError(f"connection error on {self.socket_path} ({exc.__class__.__name__})") from None
            except BaseException:  # cancellation included: the connection is mid-exchange, drop it
                if conn is not None:
                    conn.abort()
                raise
            if keep_alive and not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
            else:
                await conn.aclose()
            return response
        raise AssertionError("unreachable")  # pragma: no cover
