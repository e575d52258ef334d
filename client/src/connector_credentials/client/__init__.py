"""Client for the connector-credentials socket API (standard library only).

The operator runs as a sidecar and serves secret values over HTTP/1.1 on a Unix domain
socket. This module is what the controller imports to read them::

    from connector_credentials.client import CredentialClient

    with CredentialClient() as client:
        credential = client.get("default", "db-password")
        connect(password=credential.value)

:class:`CredentialClient` is synchronous and thread-safe; :class:`AsyncCredentialClient`
is its asyncio twin. Both keep connections alive, read answers through the same HTTP code
(``_http``) and turn them into a :class:`Credential`, a list of :class:`CredentialInfo`,
or a :class:`CredentialError` subclass (``_errors``) through the same parsing (``_api``). ``watch`` follows
one credential over a stream (``_watch``). Everything public is importable from here.

A :class:`Credential` never shows its value: ``repr``, ``str`` and ``format`` mask it, it
is not a dataclass, has no ``__dict__`` and refuses to be pickled. The value is only read
through ``value``, ``bytes_value`` or :meth:`Credential.as_bytes`.

This package is its own distribution, ``connector-credentials-client`` (client/pyproject.toml):
the controller installs it alone. ``protocol`` is the one definition of the socket contract
(the operator's server imports it too), and ``openapi.json`` describes the same contract for
other languages.

May import: the standard library only, here and in ``_api``, ``_http`` and ``protocol``; nothing
of the operator (``.importlinter``'s client contracts; CI also runs the wheel alone under an
import hook that refuses anything else). The controller may also vendor these six modules.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import threading
from types import TracebackType
from typing import Final, Self

from . import protocol

# Relative imports: the client's modules can be vendored together under any package name.
from ._api import (
    MASK,
    Credential,
    CredentialInfo,
    Encoding,
    parse_credential,
    parse_credential_list,
    parse_health,
    parse_retry_after,
    parse_rfc3339,
)
from ._errors import (
    CredentialError,
    CredentialNotFound,
    CredentialTimeout,
    CredentialUnavailable,
    PermissionDenied,
    ProtocolError,
    ServerUnreachable,
    closed_client,
    dropped,
    timed_out,
    unreachable,
)
from ._http import AsyncConnection, Connection, Dropped, Malformed, Response
from ._watch import AsyncCredentialWatch, CredentialWatch
from .protocol import CREDENTIALS_PATH, DEFAULT_SOCKET_PATH, HEALTHZ_PATH, SOCKET_PATH_ENV

# Defined in _api, but imported from here: tracebacks and pickled errors name this module, as they always have.
for _public in (
    AsyncCredentialWatch,
    CredentialWatch,
    Credential,
    CredentialInfo,
    CredentialError,
    CredentialNotFound,
    CredentialTimeout,
    CredentialUnavailable,
    PermissionDenied,
    ProtocolError,
    ServerUnreachable,
):
    _public.__module__ = __name__
del _public

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MASK",
    "SOCKET_PATH_ENV",
    "AsyncCredentialClient",
    "AsyncCredentialWatch",
    "Credential",
    "CredentialClient",
    "CredentialError",
    "CredentialInfo",
    "CredentialNotFound",
    "CredentialTimeout",
    "CredentialUnavailable",
    "CredentialWatch",
    "Encoding",
    "PermissionDenied",
    "ProtocolError",
    "ServerUnreachable",
    "parse_retry_after",
    "parse_rfc3339",
    "resolve_socket_path",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 5.0

#: Idle keep-alive connections kept per client; more may be open while requests overlap.
_MAX_IDLE: Final = 4

#: What a namespace and a name must be: pattern, length limit, and the rule in words for the ValueError.
_NAME_RULES: Final = {
    "namespace": (
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"),
        63,
        "DNS-1123 label",
        "and '-', starting and ending with a letter or digit",
    ),
    "name": (
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
        253,
        "DNS-1123 subdomain",
        "'-' and '.', each dot-separated part starting and ending with a letter or digit",
    ),
}


# --------------------------------------------------------------------------- requests and failures


def resolve_socket_path(socket_path: str | os.PathLike[str] | None = None) -> str:
    """The socket to use: the argument, else ``$CCRED_SOCKET_PATH``, else the default."""
    if socket_path is not None:
        return os.fspath(socket_path)
    return os.environ.get(SOCKET_PATH_ENV) or DEFAULT_SOCKET_PATH


def _check_name(kind: str, text: object) -> None:
    pattern, limit, rule, chars = _NAME_RULES[kind]
    if not isinstance(text, str):
        raise TypeError(f"{kind} must be a str, not {type(text).__name__}")
    if len(text) > limit or not pattern.fullmatch(text):
        raise ValueError(
            f"{kind} {text[:300]!r} is not a valid Kubernetes name: it must be a {rule} "
            f"(at most {limit} characters: lowercase letters, digits, {chars})"
        )


def credential_path(namespace: str, name: str, *, refresh: bool = False, watch: bool = False) -> str:
    """The request target for one credential, after checking both names."""
    _check_name("namespace", namespace)
    _check_name("name", name)
    target = protocol.credential_path(namespace, name)
    if watch:
        return f"{target}?{protocol.WATCH_PARAM}=true"
    return f"{target}?{protocol.REFRESH_PARAM}=true" if refresh else target


# --------------------------------------------------------------------------- clients


class CredentialClient:
    """Synchronous, thread-safe client of the credentials socket.

    Connections are kept alive and reused (a few idle ones at most; threads that overlap
    get their own). A reused connection the server has meanwhile closed is replaced
    transparently, once. ``timeout`` bounds each socket operation.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: builtins.list[Connection] = []
        self._closed = False

    def get(self, namespace: str, name: str, refresh: bool = False) -> Credential:
        """The credential's value; ``refresh=True`` makes the operator fetch it from AWS now."""
        target = credential_path(namespace, name, refresh=refresh)
        return parse_credential(self._request(target), namespace, name)

    def watch(self, namespace: str, name: str) -> CredentialWatch:
        """The credential now, then at each change: an endless iterator of :class:`Credential` or
        :class:`CredentialError` items that reconnects with backoff (see :class:`CredentialWatch`).
        It holds a connection of its own, not one of the client's kept-alive ones."""
        target = credential_path(namespace, name, watch=True)
        if self._closed:
            raise closed_client()
        backlog_wait = DEFAULT_TIMEOUT if self.timeout is None else self.timeout
        return CredentialWatch(self, target, namespace, name, backlog_wait)

    def list(self) -> builtins.list[CredentialInfo]:
        """Every credential the operator serves, with its state (never values)."""
        return parse_credential_list(self._request(CREDENTIALS_PATH))

    def healthy(self) -> bool:
        """Whether the operator answers ``/healthz`` with ``ok``; never raises :class:`CredentialError`."""
        try:
            return parse_health(self._request(HEALTHZ_PATH))
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

    def _acquire(self, *, fresh: bool) -> tuple[Connection, bool]:
        with self._lock:
            if self._closed:
                raise closed_client()
            if self._idle and not fresh:
                return self._idle.pop(), True
        # Without a timeout, waiting for room in a full backlog is still bounded (by the default).
        backlog_wait = DEFAULT_TIMEOUT if self.timeout is None else self.timeout
        try:
            return Connection.open(self.socket_path, self.timeout, backlog_wait), False
        except TimeoutError:
            raise timed_out(self.socket_path, self.timeout) from None
        except OSError as exc:
            raise unreachable(self.socket_path, exc) from exc

    def _release(self, conn: Connection, response: Response) -> None:
        if response.keep_alive:
            with self._lock:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def _request(self, target: str) -> Response:
        for attempt in (1, 2):
            # A retry always uses a new connection: the other idle ones may be just as stale.
            conn, reused = self._acquire(fresh=attempt == 2)
            try:
                response = conn.exchange(target)
            except Dropped:
                conn.close()
                if reused and attempt == 1:
                    log.debug("keep-alive connection to %s was closed by the server; reconnecting", self.socket_path)
                    continue
                raise dropped(self.socket_path) from None
            except TimeoutError:
                conn.close()
                raise timed_out(self.socket_path, self.timeout) from None
            except Malformed as exc:
                conn.close()
                failure = ProtocolError(exc.message, status=exc.status)
            except OSError as exc:
                conn.close()
                failure = ProtocolError(f"connection error on {self.socket_path} ({exc.__class__.__name__})")
            except BaseException:
                conn.close()
                raise
            else:
                self._release(conn, response)
                return response
            # Raised outside the ``except`` so that the error carries no exception context.
            raise failure
        raise AssertionError("unreachable")  # pragma: no cover


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
        self._idle: builtins.list[AsyncConnection] = []
        self._closed = False

    async def get(self, namespace: str, name: str, refresh: bool = False) -> Credential:
        """The credential's value; ``refresh=True`` makes the operator fetch it from AWS now."""
        target = credential_path(namespace, name, refresh=refresh)
        return parse_credential(await self._request(target), namespace, name)

    def watch(self, namespace: str, name: str) -> AsyncCredentialWatch:
        """The credential now, then at each change: an endless async iterator of :class:`Credential`
        or :class:`CredentialError` items that reconnects with backoff (see :class:`AsyncCredentialWatch`).
        It holds a connection of its own, not one of the client's kept-alive ones."""
        target = credential_path(namespace, name, watch=True)
        if self._closed:
            raise closed_client()
        return AsyncCredentialWatch(self, target, namespace, name)

    async def list(self) -> builtins.list[CredentialInfo]:
        """Every credential the operator serves, with its state (never values)."""
        return parse_credential_list(await self._request(CREDENTIALS_PATH))

    async def healthy(self) -> bool:
        """Whether the operator answers ``/healthz`` with ``ok``; never raises :class:`CredentialError`."""
        try:
            return parse_health(await self._request(HEALTHZ_PATH))
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

    def _take_idle(self) -> AsyncConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> AsyncConnection:
        try:
            return await AsyncConnection.open(self.socket_path)
        except OSError as exc:
            raise unreachable(self.socket_path, exc) from exc

    async def _request(self, target: str) -> Response:
        import asyncio  # here, not at the top: the synchronous client (and the CLI) never pay for it

        for attempt in (1, 2):
            if self._closed:
                raise closed_client()
            # A retry always uses a new connection: the other idle ones may be just as stale.
            conn = self._take_idle() if attempt == 1 else None
            reused = conn is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await self._connect()
                    response = await conn.exchange(target)
            except TimeoutError:
                if conn is not None:
                    conn.abort()
                raise timed_out(self.socket_path, self.timeout) from None
            except Dropped:
                assert conn is not None
                conn.abort()
                if reused and attempt == 1:
                    log.debug("keep-alive connection to %s was closed by the server; reconnecting", self.socket_path)
                    continue
                raise dropped(self.socket_path) from None
            except Malformed as exc:
                assert conn is not None
                conn.abort()
                failure = ProtocolError(exc.message, status=exc.status)
            except OSError as exc:
                assert conn is not None
                conn.abort()
                failure = ProtocolError(f"connection error on {self.socket_path} ({exc.__class__.__name__})")
            except BaseException:  # cancellation included: the connection is mid-exchange, drop it
                if conn is not None:
                    conn.abort()
                raise
            else:
                if response.keep_alive and not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                else:
                    await conn.aclose()
                return response
            # Raised outside the ``except`` so that the error carries no exception context.
            raise failure
        raise AssertionError("unreachable")  # pragma: no cover
