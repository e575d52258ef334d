"""A small fault-injecting proxy in front of the real kube-apiserver (test-only).

The operator's kubeconfig points here (plain HTTP on 127.0.0.1, its bearer token passed
through); the proxy forwards every request to the API server over TLS and can, on request,
answer with an error status, drop the open watch streams, or stall them (keep the connection
open and forward nothing more). It also records the requests it saw. The tests' own setup talks
to the API server directly, so faults never hit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
import aiohttp.web

from tests.support.lifecycle import Service

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
STATUS_PATCH = re.compile(r"/connectorcredentials/[^/]+/status$")


@dataclass
class Fault:
    method: str | None
    path: re.Pattern[str]
    status: int
    times: int | None  # None: until cleared
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if (self.method is not None and method != self.method) or not self.path.search(path):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Seen:
    method: str
    path: str
    query: str
    at: float
    status: int = 0
    content_type: str = ""
    #: Who asked: kopf's requests say ``kopf/...``, the operator's own ``connector-credential-operator/...``.
    user_agent: str = ""


@dataclass
class _Stream:
    response: aiohttp.web.StreamResponse
    path: str
    opened: float
    stalled: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class KubeFaultProxy(Service):
    def __init__(self, upstream: str, ssl_context: ssl.SSLContext) -> None:
        self.upstream = upstream.rstrip("/")
        # Forward with the caller's credentials only: no client certificate of the admin's.
        self._ssl = ssl.create_default_context(cafile=None)
        self._ssl.load_verify_locations(cadata=_ca_of(ssl_context))
        self.port = 0
        self.seen: list[Seen] = []
        self._faults: list[Fault] = []
        self._streams: list[_Stream] = []
        self._stall_new = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-proxy", daemon=True)
        self._runner: aiohttp.web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl), timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
        )
        # A client that goes away cancels its handler: its watch stream ends here too.
        server = aiohttp.web.Server(self._handle, handler_cancellation=True)
        runner = self._runner = aiohttp.web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        await self._drop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- faults ------------------------------------------------------------------------------

    def fail_requests(
        self, method: str | None, path: str | re.Pattern[str], *, status: int, times: int | None = 1
    ) -> Fault:
        fault = Fault(method, re.compile(path) if isinstance(path, str) else path, status, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail_status_patches(self, times: int | None = 1, *, status: int = 409) -> Fault:
        return self.fail_requests("PATCH", STATUS_PATCH, status=status, times=times)

    def remove_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [kept for kept in self._faults if kept is not fault]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def drop_watches(self, namespace: str | None = None) -> int:
        """Close the open watch streams (of one namespace, or all as an API server restart does).

        Returns how many were closed.
        """
        return int(self._call(self._drop(namespace)))

    async def _drop(self, namespace: str | None = None) -> int:
        streams = [stream for stream in self._streams if not stream.closed.is_set() and _in(stream, namespace)]
        for stream in streams:
            stream.closed.set()
        return len(streams)

    @property
    def active_watches(self) -> int:
        return self.watches()

    def watches(self, namespace: str | None = None, *, opened_after: float | None = None) -> int:
        """The open, flowing watch streams: of one namespace, opened after a `time.monotonic()`.

        The proxy is shared by the whole session: a stream of another test's operator that has
        not been torn down yet must not count as this operator's re-watch.
        """
        return sum(
            1
            for stream in list(self._streams)
            if not stream.closed.is_set()
            and not stream.stalled
            and _in(stream, namespace)
            and (opened_after is None or stream.opened > opened_after)
        )

    def stall_watches(self, stalled: bool = True) -> None:
        """Stall the open watch streams and, while on, every new one: connected, silent forever."""

        def apply() -> None:
            self._stall_new = stalled
            if stalled:
                for stream in self._streams:
                    stream.stalled = True

        self._loop.call_soon_threadsafe(apply)

    def requests(self, method: str, path: str | re.Pattern[str]) -> list[Seen]:
        pattern = re.compile(path) if isinstance(path, str) else path
        with self._lock:
            return [seen for seen in self.seen if seen.method == method and pattern.search(seen.path)]

    # -- forwarding --------------------------------------------------------------------------

    async def _handle(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        seen = Seen(
            request.method,
            request.path,
            request.query_string,
            time.monotonic(),
            content_type=request.content_type,
            user_agent=request.headers.get("User-Agent", ""),
        )
        with self._lock:
            self.seen.append(seen)
            fault = next((f for f in self._faults if f.take(request.method, request.path)), None)
        if fault is not None:
            seen.status = fault.status
            return _status(fault.status)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        url = f"{self.upstream}{request.raw_path}"
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                # Transparent: a request sent without Content-Type must not gain one here.
                skip_auto_headers=() if "Content-Type" in request.headers else ("Content-Type",),
            )
        except aiohttp.ClientError:
            seen.status = 502
            return _status(502)
        seen.status = upstream.status
        if request.query.get("watch") not in ("true", "1"):
            async with upstream:
                payload = await upstream.read()
            return aiohttp.web.Response(status=upstream.status, body=payload, headers=_copy(upstream.headers))
        return await self._stream(request, upstream)

    async def _stream(
        self, request: aiohttp.web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.StreamResponse(status=upstream.status, headers=_copy(upstream.headers))
        stream = _Stream(response, request.path, time.monotonic(), stalled=self._stall_new)
        self._streams.append(stream)
        await response.prepare(request)
        closed = asyncio.create_task(stream.closed.wait())
        chunk_task: asyncio.Task[bytes] | None = None
        try:
            async with upstream:
                while not stream.closed.is_set():
                    chunk_task = asyncio.create_task(upstream.content.readany())
                    done, _ = await asyncio.wait({chunk_task, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if chunk_task not in done:
                        chunk_task.cancel()
                        chunk_task.add_done_callback(_consume)
                        break
                    chunk = chunk_task.result()
                    if not chunk:
                        break
                    if not stream.stalled:
                        await response.write(chunk)
        except (aiohttp.ClientError, ConnectionError):
            pass  # either side went away: the stream is over
        finally:
            closed.cancel()
            if chunk_task is not None and not chunk_task.done():
                # Cancelled while waiting (the proxy stops): the read may still end in an error.
                chunk_task.cancel()
                chunk_task.add_done_callback(_consume)
            stream.closed.set()
            self._streams.remove(stream)
        if stream.stalled:
            # Dropped while stalled: end it abruptly, as a dead peer would.
            if request.transport is not None:
                request.transport.close()
            return response
        with contextlib.suppress(ConnectionError):  # the client went away first
            await response.write_eof()
        return response


def _in(stream: _Stream, namespace: str | None) -> bool:
    return namespace is None or f"/namespaces/{namespace}/" in stream.path


def _consume(task: asyncio.Task[Any]) -> None:
    # A read abandoned when the stream was dropped may still end in an error: nobody needs it.
    if not task.cancelled():
        task.exception()


def _copy(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"}


def _status(code: int) -> aiohttp.web.Response:
    reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
    reason = reasons.get(code, "InternalError")
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": f"injected by the test proxy: {reason}",
        "reason": reason,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code, headers={"Retry-After": "1"} if code in (429, 503) else None)


def _ca_of(context: ssl.SSLContext) -> str:
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in context.get_ca_certs(binary_form=True))
