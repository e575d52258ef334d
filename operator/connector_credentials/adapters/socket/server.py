"""The credential server: HTTP/1.1 on a Unix socket shared with the controller container.

Values leave the process only here, in a 200 response body. Every connection is checked
against the peer's uid (``SO_PEERCRED``) when it is accepted, before any of its bytes are read
(:mod:`connector_credentials.adapters.socket.connections`); every response says ``Cache-Control: no-store``.
No client-supplied text reaches the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from connector_credentials.adapters.socket.connections import (
    FD_RESERVE,
    ConnectionPolicy,
    Peer,
    peer_of,
    raise_fd_limit,
)
from connector_credentials.adapters.socket.responses import credential_response, document, error, failure
from connector_credentials.adapters.socket.watch import WatchResponse, WatchStreams
from connector_credentials.api.wire import JSON_HEADERS, closing_error
from connector_credentials.client.protocol import (
    CREDENTIALS_PATH,
    HEALTHZ_PATH,
    NAME_PATTERN,
    NAMESPACE_PATTERN,
    REFRESH_PARAM,
    REFRESH_VALUES,
    WATCH_PARAM,
    WATCH_VALUES,
    ErrorReason,
)
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.supervise import log_bug

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(NAMESPACE_PATTERN)
_NAME = re.compile(NAME_PATTERN)
_PREFIX = CREDENTIALS_PATH + "/"
_BACKLOG = 512
#: At shutdown, what a connection (or a watch stream writing its last chunk) is given before it is cut.
_SHUTDOWN_TIMEOUT = 2.0
#: A refused peer's bytes are read and dropped (never parsed) up to this much, then it is closed.
_DISCARD_LIMIT = 64 * 1024
_REFUSAL = closing_error(
    403, "Forbidden", ErrorReason.PERMISSION_DENIED, "This process's uid may not read credentials (CCRED_ALLOWED_UIDS)."
)


class _Handler(RequestHandler):
    """aiohttp's connection handler, under the accept-time policy, answering parser errors in the API's shape.

    A refused peer gets :data:`_REFUSAL` and the end of the stream at once; what it sends is
    read and dropped, and it is closed when it closes its end (or after ``CCRED_HEADER_TIMEOUT``).
    Reading on to the peer's end lets it read the 403 instead of a reset.

    Two private attributes of aiohttp's ``RequestHandler`` are read, because aiohttp has no public
    hook for either: ``_request_count`` (request heads the parser completed: the request arrived,
    so the head deadline stops and the connection is busy) and ``_messages`` (requests parsed and
    not handled yet: an answered connection with pipelined requests is still busy). A request
    handler or request factory would only learn of a request when aiohttp takes it out of the
    queue, after a pipelined one waited there counted as idle (closable to make room) and without
    a head deadline. aiohttp is pinned in constraints.txt for this reason (docs/design.md, "The
    socket borrows two private attributes of aiohttp"), and
    tests/unit/adapters/test_socket_handler.py fails if either changes name or meaning.
    Everything else used here is public, the loop included (our own reference, not aiohttp's).
    """

    def __init__(
        self, manager: web.Server, *, policy: ConnectionPolicy, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._policy = policy
        self._event_loop = loop
        self._refused: asyncio.Transport | None = None
        self._discarded = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        peer = peer_of(stream)
        allowed = self._policy.allows(peer)
        if not self._policy.table.admit(self, refused=not allowed):
            stream.abort()  # at CCRED_MAX_CONNECTIONS with none idle (counted in the log)
            return
        if not allowed:
            self._refuse(stream, peer)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _refuse(self, transport: asyncio.Transport, peer: Peer | None) -> None:
        self._refused = transport
        self._policy.log_refusal(peer)
        transport.write(_REFUSAL)
        if not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._head_timer = self._event_loop.call_later(self._policy.header_timeout, self.evict)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._discarded += len(data)
            if self._discarded > _DISCARD_LIMIT:
                self.evict()
            return
        parsed = self._request_count  # private (see the class): no public hook says a head was parsed
        super().data_received(data)
        if self._request_count != parsed:
            # A complete request head (or a parse error, answered 400): in flight until answered.
            self._cancel_head_timer()
            self._policy.table.busy(self)
        elif data and self._head_timer is None and not self._policy.table.is_busy(self) and self.transport:
            self._arm_head_timer()  # the first bytes of the next request on a kept-alive connection

    def answered(self) -> None:
        """The handler returned: idle again unless pipelined requests wait."""
        if not self._messages:  # private (see the class): requests parsed, not handled yet
            self._policy.table.idle(self)

    def when_lost(self) -> asyncio.Future[None]:
        """Resolved when the connection is gone: a watch stream waits on it besides its credential."""
        if self._lost is None:
            self._lost = self._event_loop.create_future()
            if self.transport is None:
                self._lost.set_result(None)
        return self._lost

    def evict(self) -> None:
        self._cancel_head_timer()
        transport = self._refused or self.transport
        self.force_close()
        if transport is not None:
            transport.abort()  # drops what a peer that does not read left in the buffer

    def connection_lost(self, exc: BaseException | None) -> None:
        self._policy.table.discard(self)
        self._cancel_head_timer()
        self._refused = None
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._event_loop.call_later(self._policy.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._policy.table.is_busy(self):
            self._policy.report.add("header_timeout")
            self.evict()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Malformed requests are the client's problem: no traceback per request, no echo of its bytes.
        text = "Malformed HTTP request." if status < 500 else "The operator failed to answer; see its log."
        if status >= 500:
            logger.warning("Failed to handle a request: %s", type(exc).__name__ if exc else "unknown error")
        response = error(status, ErrorReason.BAD_REQUEST if status < 500 else ErrorReason.INTERNAL_ERROR, text)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`_Handler` connections. ``options`` are the
    connection handler's (``RequestHandler``'s: limits, keep-alive, logging); the server keeps its
    own copies of them and of the loop, rather than reading ``web.Server``'s private ones."""

    def __init__(self, handler: Any, *, policy: ConnectionPolicy, **options: Any) -> None:
        super().__init__(handler, **options)
        self.policy = policy
        self._handler_loop = asyncio.get_running_loop()
        self._handler_options = options

    def __call__(self) -> RequestHandler:
        return _Handler(self, policy=self.policy, loop=self._handler_loop, **self._handler_options)


class SocketInUseError(RuntimeError):
    """Another live process serves on the socket path."""


class CredentialServer:
    """Serves :class:`Engine` over a Unix socket; owns the socket file's life."""

    def __init__(self, settings: OperatorSettings, engine: Engine, healthy: Callable[[], bool]) -> None:
        self._settings = settings
        self._engine = engine
        self._healthy = healthy
        self._allowed = frozenset(settings.allowed_uids)
        self._policy = ConnectionPolicy(self._allowed, settings.max_connections, settings.header_timeout)
        self._path = Path(settings.socket_path)
        self._runner: web.ServerRunner | None = None
        self._inode: int | None = None
        self._meter = engine.metrics
        self._watches = WatchStreams(engine, settings.watch_heartbeat, self._policy.report)

    @property
    def path(self) -> Path:
        return self._path

    def make_server(self) -> web.Server:
        # The low-level server: every request reaches _handle (no router to bypass it).
        return _Server(
            self._handle,
            policy=self._policy,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=64,
            keepalive_timeout=30.0,
            access_log=None,
        )

    async def start(self) -> None:
        self._fit_fd_limit()
        sock = self._bind()
        self._runner = web.ServerRunner(self.make_server(), handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, backlog=_BACKLOG)
        await site.start()
        logger.info(
            "Serving credentials on %s (mode %04o, allowed uids %s, at most %d connections).",
            self._path,
            self._settings.socket_mode,
            ",".join(map(str, sorted(self._allowed))),
            self._policy.table.limit,
        )

    def _fit_fd_limit(self) -> None:
        """Room for every connection, a full backlog accepted at once, and the rest of the process.

        Out of descriptors, asyncio stops accepting for a second at a time: the soft limit is
        raised (up to the hard one), or else the connection limit lowered to fit under it.
        """
        wanted = self._settings.max_connections
        available = raise_fd_limit(wanted + _BACKLOG + FD_RESERVE) - _BACKLOG - FD_RESERVE
        if available < wanted:
            self._policy.table.limit = max(16, available)
            logger.warning(
                "The file descriptor limit (RLIMIT_NOFILE) leaves room for %d socket connections, "
                "not CCRED_MAX_CONNECTIONS=%d; raise the hard limit to hold more.",
                self._policy.table.limit,
                wanted,
            )

    async def close(self) -> None:
        """Stop listening, end the watch streams cleanly, then close every connection."""
        self._policy.close()
        if self._runner is not None:
            try:
                await asyncio.shield(self._close_runner(self._runner))
            except Exception as exc:  # noqa: BLE001 - closing goes on: the socket file is removed below
                log_bug(logger, "Closing the socket server", exc)
            self._runner = None
        self._unlink_own()

    async def _close_runner(self, runner: web.ServerRunner) -> None:
        # Not listening first: a watch client told "the end" must not reconnect to a closing server.
        for site in list(runner.sites):
            await site.stop()
        try:
            await self._watches.end(within=_SHUTDOWN_TIMEOUT)
        finally:
            await runner.cleanup()

    # --- the socket file ---------------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self._path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind with a strict umask so the file never exists with looser permissions.
        old_umask = os.umask(0o777 & ~self._settings.socket_mode)
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, self._settings.socket_mode)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
        self._inode = os.stat(path).st_ino
        return sock

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            logger.info("Removing the stale socket %s left by an earlier run.", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        finally:
            probe.close()
        raise SocketInUseError(f"another process is serving on {path}")

    def _unlink_own(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._path).st_ino == self._inode:
                self._path.unlink()
        self._inode = None

    # --- requests ----------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Only allowed peers get here: the uid was checked when the connection was accepted.
        started = time.perf_counter()
        code: int | None = 500
        try:
            response = await self._route(request)
            # A watch stream counts itself, once, when its first line is out.
            code = None if isinstance(response, WatchResponse) else response.status
            return response
        except Exception as exc:  # noqa: BLE001 - any failure is a 500, logged without the request's text
            logger.error("Failed to answer a request: %s.", failure(exc))  # noqa: TRY400 - no message, no text
            return error(500, ErrorReason.INTERNAL_ERROR, "The operator failed to answer; see its log.")
        finally:
            if isinstance(request.protocol, _Handler):
                request.protocol.answered()
            if code is not None:
                self._meter.socket_answered(code, time.perf_counter() - started)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version not in ((1, 0), (1, 1)):
            return error(400, ErrorReason.BAD_REQUEST, "Only HTTP/1.0 and HTTP/1.1 are served.")
        if request.method not in ("GET", "HEAD"):
            return error(405, ErrorReason.METHOD_NOT_ALLOWED, "Only GET is served.", {"Allow": "GET, HEAD"})
        path = request.path
        if path in (CREDENTIALS_PATH, _PREFIX):
            return document({"credentials": self._engine.describe()})
        if path.startswith(_PREFIX):
            if not request.query_string:
                # Hot path: a cached credential is a dict lookup and bytes rendered at fetch time.
                namespace, _, name = path[len(_PREFIX) :].partition("/")
                body = self._engine.cached_body(namespace, name)
                if body is not None:
                    return web.Response(body=body, headers=JSON_HEADERS)
            parts = path[len(_PREFIX) :].split("/")
            if len(parts) != 2:
                return error(400, ErrorReason.BAD_REQUEST, "Use /v1/credentials/{namespace}/{name}.")
            namespace, name = parts
            if not _NAMESPACE.match(namespace) or not _NAME.match(name):
                return error(400, ErrorReason.BAD_REQUEST, "namespace and name must be valid Kubernetes object names.")
            refresh_arg = request.query.get(REFRESH_PARAM, "false").lower()
            if refresh_arg not in REFRESH_VALUES:
                return error(400, ErrorReason.BAD_REQUEST, "refresh must be true or false.")
            watch_arg = request.query.get(WATCH_PARAM, "false").lower()
            if watch_arg not in WATCH_VALUES:
                return error(400, ErrorReason.BAD_REQUEST, "watch must be true or false.")
            refresh = REFRESH_VALUES[refresh_arg]
            if WATCH_VALUES[watch_arg]:
                return await self._watch(request, namespace, name, refresh=refresh)
            return credential_response(await self._engine.serve(namespace, name, refresh=refresh))
        if path == HEALTHZ_PATH:
            if self._healthy():
                return document({"status": "ok"})
            return error(
                503,
                ErrorReason.NOT_READY,
                "The operator is not connected to the Kubernetes API yet.",
                {"Retry-After": "1"},
            )
        return error(404, ErrorReason.NOT_FOUND, "No such endpoint; see /v1/credentials/{namespace}/{name}.")

    async def _watch(self, request: web.BaseRequest, namespace: str, name: str, *, refresh: bool) -> web.StreamResponse:
        if request.version != (1, 1):
            return error(400, ErrorReason.BAD_REQUEST, "watch=true needs HTTP/1.1 (the stream is chunked).")
        connection = request.protocol
        if not isinstance(connection, _Handler):  # pragma: no cover - every connection of this server is one
            raise TypeError("a watch needs the server's own connection handler")
        return await self._watches.serve(request, connection, namespace, name, refresh=refresh)
