"""Watch streams: ``GET /v1/credentials/{namespace}/{name}?watch=true``.

The answer is ``200``, ``application/x-ndjson``, chunked: one line per answer a plain GET would give
at that moment (:func:`~connector_credentials.api.wire.watch_line`: the same bytes, with the status):
the current answer first, then one line per change of what it says (:func:`says`: the value, the
versionId, the status and error reason; not ``fetchedAt``, not a message), and an empty line when a
heartbeat interval (``CCRED_WATCH_HEARTBEAT``, 30 s) passed without a line.

Waiting: a ticket of the engine's :class:`~connector_credentials.core.changes.Changes` is taken
*before* each answer is rendered, so a change made while a line is written still wakes the stream.
Each heartbeat re-evaluates the answer too, so a missed notice cannot leave a stream stale for
longer than one interval.

Connections: a stream is a request in flight, so its connection is busy for the stream's whole life:
it counts against ``CCRED_MAX_CONNECTIONS`` and is never closed to make room (only idle connections
are, see :mod:`connections`). Back-pressure: every write is bounded by the heartbeat interval, and
aiohttp's write waits for the socket to drain once 64 KiB are buffered, so a client that stops
reading holds at most about that much of the operator's memory (besides the kernel's socket
buffer) and is closed when a write has waited a whole interval (counted in the log).

Shutdown: the engine drains first (streams go on, with what the engine answers while it drains),
then :meth:`WatchStreams.end` has every stream write its last, zero-length chunk, so that clients
see a clean end of the body rather than a reset, before the server closes the connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from typing import Final, NamedTuple, Protocol

from aiohttp import web

from connector_credentials.adapters.socket.connections import Report
from connector_credentials.adapters.socket.responses import failure, render
from connector_credentials.api.wire import HEADERS, watch_line
from connector_credentials.client.protocol import WATCH_CONTENT_TYPE
from connector_credentials.core.engine import Engine, Served

logger = logging.getLogger(__name__)

STREAM_HEADERS: Final = {"Content-Type": WATCH_CONTENT_TYPE, **HEADERS}
HEARTBEAT_LINE: Final = b"\n"
#: A keyed digest stands for the value in what a stream remembers: it keeps no copy of a value the
#: engine may have dropped since, and the digest means nothing outside this process.
_DIGEST_KEY: Final = secrets.token_bytes(32)


class Says(NamedTuple):
    """What a watch compares between two answers: a line is sent when any of it differs."""

    status: int
    #: The error's reason (``None`` for a 200): with the status, the credential's availability.
    reason: str | None
    version_id: str | None
    #: A keyed digest of the value and its encoding (``None`` without a value).
    value: bytes | None


def says(served: Served) -> Says:
    """What an answer says, for a watch: ``fetchedAt`` (a re-read of the same version) and an error's
    message (a retry count, a backoff time) change nothing a controller acts on, so they are left out."""
    if served.status == 200 and served.value is not None:
        raw = served.value.reveal()
        digest = hashlib.blake2b(key=_DIGEST_KEY, digest_size=16)
        digest.update(b"b" if isinstance(raw, bytes) else b"t")
        digest.update(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
        return Says(200, None, served.version_id, digest.digest())
    return Says(served.status, served.reason, None, None)


def line(served: Served) -> bytes:
    rendered = render(served)
    return watch_line(rendered.status, rendered.body)


class WatchedConnection(Protocol):
    """What a stream needs of its connection (the server's connection handler)."""

    def when_lost(self) -> asyncio.Future[None]:
        """Resolved when the connection is gone (the client hung up, or it was closed)."""
        ...

    def evict(self) -> None:
        """Close at once, dropping what is buffered."""
        ...


class WatchResponse(web.StreamResponse):
    """A watch stream's response. The server's per-request metrics skip it: a stream counts itself,
    once, when its first line is out (a 200 whose duration is the time to that line)."""


class _Stalled(Exception):
    """A write waited a whole heartbeat interval: the client does not read."""


class WatchStreams:
    """The watch streams of one server: each serves one request; all end together at shutdown."""

    def __init__(self, engine: Engine, heartbeat: float, report: Report) -> None:
        self._engine = engine
        self._heartbeat = heartbeat
        self._report = report
        self._streams: set[_Stream] = set()
        self._closing = False

    def __len__(self) -> int:
        return len(self._streams)

    async def serve(
        self, request: web.BaseRequest, connection: WatchedConnection, namespace: str, name: str, *, refresh: bool
    ) -> web.StreamResponse:
        """Stream until the client goes, stops reading, or the server ends every stream.

        A HEAD gets the stream's head alone (counted by the server as any request). ``refresh``
        applies to the first line, as to a plain GET."""
        if request.method == "HEAD":
            response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write_eof()
            return response
        stream = _Stream(self._engine, request, connection, (namespace, name), self._heartbeat)
        if self._closing:
            stream.stop()  # a request on a kept-alive connection while the server ends: one line, then the end
        self._streams.add(stream)
        try:
            return await stream.run(refresh=refresh, report=self._report)
        finally:
            self._streams.discard(stream)

    async def end(self, within: float) -> None:
        """Every stream writes its last chunk and returns; one that cannot ``within`` seconds (its
        client does not read) is closed. Streams asked for from now on end after their first line."""
        self._closing = True
        streams = list(self._streams)
        for stream in streams:
            stream.stop()
        if not streams:
            return
        _, late = await asyncio.wait([stream.finished for stream in streams], timeout=within)
        for stream in streams:
            if stream.finished in late:
                stream.cut()


class _Stream:
    """One watch: its request, its connection, the credential it follows."""

    def __init__(
        self,
        engine: Engine,
        request: web.BaseRequest,
        connection: WatchedConnection,
        key: tuple[str, str],
        heartbeat: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._engine, self._request, self._connection, self._key = engine, request, connection, key
        self._heartbeat = heartbeat
        self._stopped: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._response = WatchResponse(status=200, headers=STREAM_HEADERS)

    def stop(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def cut(self) -> None:
        self._connection.evict()

    async def run(self, *, refresh: bool, report: Report) -> WatchResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._stream(refresh, started)
        except _Stalled:
            report.add("stalled_watch")
            self.cut()
        except ConnectionError:
            pass  # the client went away while a line was written: nothing to end
        except Exception as exc:
            if not self._response.prepared:
                raise  # nothing sent yet: the server answers 500
            # The head is sent: no error answer can follow, only a cut (the client reconnects).
            logger.error("Failed to stream a watch: %s.", failure(exc))  # noqa: TRY400 - no message, no text
            self.cut()
        finally:
            # The engine keeps a ticket until its credential changes, and a name nobody declares
            # never does: resolving it here keeps the table to the credentials watched now (other
            # streams of this credential wake, compare, and send nothing).
            self._engine.changes.notify(self._key)
            self.finished.set_result(None)
        return self._response

    async def _stream(self, refresh: bool, started: float) -> None:
        engine, key, loop = self._engine, self._key, asyncio.get_running_loop()
        lost = self._connection.when_lost()
        # Taken before the answer is rendered: a change while it is rendered or written wakes the stream.
        ticket = engine.changes.ticket(key)
        served = await engine.serve(*key, refresh=refresh)  # the first line answers as a plain GET does
        response = self._response
        response.enable_chunked_encoding()
        response.force_close()  # the connection ends with the stream
        await response.prepare(self._request)
        said = says(served)
        await self._send(line(served))
        engine.metrics.socket_answered(200, loop.time() - started)
        sent_at = loop.time()
        while True:
            quiet_for = sent_at + self._heartbeat - loop.time()
            if quiet_for > 0 and not ticket.done():
                # The ticket, and also the stream being stopped or its client hanging up.
                wakes = (ticket, self._stopped, lost)
                await asyncio.wait(wakes, timeout=quiet_for, return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                return  # nothing to end: the connection is gone
            if self._stopped.done():
                break
            ticket = engine.changes.ticket(key)
            served = engine.current(*key)
            now = says(served)
            if now != said:
                await self._send(line(served))
                said, sent_at = now, loop.time()
            elif loop.time() >= sent_at + self._heartbeat:
                await self._send(HEARTBEAT_LINE)  # and the answer was re-evaluated above
                sent_at = loop.time()
        try:
            async with asyncio.timeout(self._heartbeat):
                await response.write_eof()  # the zero-length chunk: a clean end of the body
        except TimeoutError:
            raise _Stalled from None

    async def _send(self, data: bytes) -> None:
        """Bounded: aiohttp waits for the socket to drain once 64 KiB are buffered; a client that has
        not taken them within a heartbeat interval is given up."""
        try:
            async with asyncio.timeout(self._heartbeat):
                await self._response.write(data)
        except TimeoutError:
            raise _Stalled from None
