"""The credential server: HTTP/1.1 on a Unix socket shared with the controller container.

Values leave the process only here, in a 200 response body. Every request is checked
against the peer's uid (``SO_PEERCRED``); every response says ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from connector_credentials.engine import Engine, Served
from connector_credentials.settings import OperatorSettings
from connector_credentials.wire import HEADERS, JSON_HEADERS, error_body, json_body, render_credential

logger = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PEERCRED = struct.Struct("3i")
_PREFIX = "/v1/credentials/"
_REFUSAL_LOG_INTERVAL = 10.0


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering parser errors in the API's own shape."""

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
        response = _error(status, "BadRequest" if status < 500 else "InternalError", text)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class SocketInUseError(RuntimeError):
    """Another live process serves on the socket path."""


def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=error_body(reason, message),
        content_type="application/json",
        headers={**HEADERS, **(headers or {})},
    )


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json_body(payload), content_type="application/json", headers=HEADERS)


def peer_credentials(request: web.BaseRequest) -> tuple[int, int] | None:
    """(pid, uid) of the process on the other end of the Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return pid, uid


class CredentialServer:
    """Serves :class:`Engine` over a Unix socket; owns the socket file's life."""

    def __init__(self, settings: OperatorSettings, engine: Engine, healthy: Callable[[], bool]) -> None:
        self._settings = settings
        self._engine = engine
        self._healthy = healthy
        self._allowed = frozenset(settings.allowed_uids)
        self._path = Path(settings.socket_path)
        self._runner: web.ServerRunner | None = None
        self._inode: int | None = None
        self._refusal_logged: dict[int, float] = {}
        self._refusals_unlogged = 0

    @property
    def path(self) -> Path:
        return self._path

    def make_server(self) -> web.Server:
        # The low-level server: every request reaches _handle (no router to bypass it).
        return _Server(
            self._handle,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=64,
            keepalive_timeout=30.0,
            access_log=None,
        )

    async def start(self) -> None:
        sock = self._bind()
        self._runner = web.ServerRunner(self.make_server(), handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, backlog=512)
        await site.start()
        logger.info(
            "Serving credentials on %s (mode %04o, allowed uids %s).",
            self._path,
            self._settings.socket_mode,
            ",".join(map(str, sorted(self._allowed))),
        )

    async def close(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._runner.cleanup())
            self._runner = None
        self._unlink_own()

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
        sock.listen(512)
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

    def _refuse(self, peer: tuple[int, int] | None, path: str) -> web.Response:
        """403 for a peer whose uid is not allowed; logged with uid and pid, once per uid every 10s."""
        pid, uid = peer if peer else (-1, -1)
        now = time.monotonic()
        if now - self._refusal_logged.get(uid, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
            if len(self._refusal_logged) > 1024:
                self._refusal_logged.clear()  # bounded: a flood of distinct uids cannot grow it
            suppressed = (
                f" ({self._refusals_unlogged} more refused since the last report)" if self._refusals_unlogged else ""
            )
            logger.warning(
                "Refused a request for %s from pid %d uid %d: uid not in CCRED_ALLOWED_UIDS%s.",
                path[:200],
                pid,
                uid,
                suppressed,
            )
            self._refusal_logged[uid], self._refusals_unlogged = now, 0
        else:
            self._refusals_unlogged += 1
        return _error(403, "PermissionDenied", "This process's uid may not read credentials (CCRED_ALLOWED_UIDS).")

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = peer_credentials(request)
        if peer is None or peer[1] not in self._allowed:
            return self._refuse(peer, request.path)
        try:
            return await self._route(request)
        except Exception:
            logger.exception("Failed to answer a %s request.", request.method)
            return _error(500, "InternalError", "The operator failed to answer; see its log.")

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version not in ((1, 0), (1, 1)):
            return _error(400, "BadRequest", "Only HTTP/1.0 and HTTP/1.1 are served.")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "MethodNotAllowed", "Only GET is served.", {"Allow": "GET, HEAD"})
        path = request.path
        if path in ("/v1/credentials", "/v1/credentials/"):
            return _json({"credentials": self._engine.describe()})
        if path.startswith(_PREFIX):
            if not request.query_string:
                # Hot path: a cached credential is a dict lookup and bytes rendered at fetch time.
                namespace, _, name = path[len(_PREFIX) :].partition("/")
                body = self._engine.cached_body(namespace, name)
                if body is not None:
                    return web.Response(body=body, headers=JSON_HEADERS)
            parts = path[len(_PREFIX) :].split("/")
            if len(parts) != 2:
                return _error(400, "BadRequest", "Use /v1/credentials/{namespace}/{name}.")
            namespace, name = parts
            if not _NAMESPACE.match(namespace) or not _NAME.match(name):
                return _error(400, "BadRequest", "namespace and name must be valid Kubernetes object names.")
            refresh_arg = request.query.get("refresh", "false").lower()
            if refresh_arg not in ("true", "false", "1", "0", ""):
                return _error(400, "BadRequest", "refresh must be true or false.")
            served = await self._engine.serve(namespace, name, refresh=refresh_arg in ("true", "1"))
            return self._credential(served)
        if path == "/healthz":
            if self._healthy():
                return _json({"status": "ok"})
            return _error(
                503, "NotReady", "The operator is not connected to the Kubernetes API yet.", {"Retry-After": "1"}
            )
        return _error(404, "NotFound", "No such endpoint; see /v1/credentials/{namespace}/{name}.")

    @staticmethod
    def _credential(served: Served) -> web.Response:
        if served.status == 200 and served.value is not None:
            body = served.body or render_credential(
                served.value,
                served.version_id or "",
                served.arn or "",
                served.fetched_at or datetime.datetime.now(datetime.UTC),
            )
            return web.Response(body=body.data, headers=JSON_HEADERS)
        headers = {"Retry-After": str(served.retry_after)} if served.retry_after is not None else None
        return _error(served.status, served.reason or "Unknown", served.message or "", headers)
