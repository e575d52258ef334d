"""The clients' ``watch``: the chunked-line decoder, the backoff, what is news, the line parsing, and
both clients following a credential across the operator's restarts (the real socket server and
engine, with a fake AWS port, on an event loop of their own in a thread)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from connector_credentials.adapters.socket.server import CredentialServer
from connector_credentials.client import (
    Credential,
    CredentialError,
    CredentialNotFound,
    CredentialUnavailable,
    ProtocolError,
    ServerUnreachable,
)
from connector_credentials.client._api import parse_watch_line
from connector_credentials.client._http import Chunks, Malformed
from connector_credentials.client._watch import BACKOFF_CAP, BACKOFF_FIRST, Backoff, news
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.ports import FetchedSecret
from tests.support.fakes import ARN, VALUE, FakePort, FakeSink, body
from tests.support.watching import Watcher

Item = Credential | CredentialError

# --------------------------------------------------------------------------- the chunked lines


def _chunk(data: bytes, extension: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), extension, data)


STREAM = b"".join(
    [
        _chunk(b'{"status": 200, "x": "a\\nb"}\n'),  # a line in one chunk
        _chunk(b"\n"),  # a heartbeat
        _chunk(b'{"sta', b";ext=1"),  # a line over two chunks (a chunk extension is ignored)
        _chunk(b'tus": 404}\n{}'),  # ... and the start of the next
        _chunk(b"\n\n"),  # the end of it, and a heartbeat
        b"0\r\n\r\n",
    ]
)
LINES = [b'{"status": 200, "x": "a\\nb"}', b"", b'{"status": 404}', b"{}", b""]


def test_chunked_lines_whatever_the_reads() -> None:
    for size in (1, 2, 3, 7, len(STREAM)):
        chunks, lines = Chunks(1024), []
        for start in range(0, len(STREAM), size):
            assert not chunks.ended
            lines += chunks.feed(STREAM[start : start + size])
        assert chunks.ended and lines == LINES, size


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"zz\r\nab\r\n", "not hexadecimal"),
        (b"2\r\nabX\r\n", "no CRLF"),
        (b"0\r\nTrailer: x\r\n\r\n", "no CRLF"),
        (b"1" * 80, "over-long chunk-size"),
        (b"400\r\n" + b"x" * 1024, "longer than 1000 bytes"),
        (b"0\r\n\r\n1\r\n", "after the end"),
    ],
)
def test_broken_framing_is_malformed_without_quoting_the_body(data: bytes, problem: str) -> None:
    chunks = Chunks(1000)

    def feed() -> None:
        chunks.feed(data)
        chunks.feed(b"1\r\n")

    with pytest.raises(Malformed, match=problem) as raised:
        feed()
    assert "x" * 20 not in raised.value.message


# --------------------------------------------------------------------------- backoff, news, lines


def test_backoff_doubles_to_its_cap_and_starts_over() -> None:
    backoff = Backoff(draw=lambda low, high: 1.0)
    steps = [backoff.next() for _ in range(10)]
    assert steps[:3] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST] and steps[-1] == BACKOFF_CAP
    backoff.reset()
    assert backoff.next() == BACKOFF_FIRST
    jittered = Backoff()
    assert all(0.8 * BACKOFF_FIRST <= Backoff().next() <= 1.2 * BACKOFF_FIRST for _ in range(50))
    assert jittered.next() <= 1.2 * BACKOFF_FIRST


def _credential(value: str = VALUE, version: str = "v1", minute: int = 0) -> Credential:
    return Credential(
        namespace="ns",
        name="n",
        value=value,
        version_id=version,
        arn=ARN,
        fetched_at=datetime(2025, 1, 1, 0, minute, tzinfo=UTC),
    )


def test_news_is_the_value_the_version_the_kind_and_the_reason() -> None:
    assert news(_credential()) == news(_credential(minute=5))  # fetched again: not news
    assert news(_credential()) != news(_credential("other")) != news(_credential(version="v2"))
    throttled = CredentialUnavailable("retry 1", reason="Throttled", status=503)
    assert news(throttled) == news(CredentialUnavailable("retry 2", reason="Throttled", status=503))
    assert news(throttled) != news(CredentialUnavailable("x", reason="AWSUnavailable", status=503))
    assert news(throttled) != news(ServerUnreachable("x"))


def test_a_line_is_what_get_would_return_or_raise() -> None:
    document = {"value": VALUE, "encoding": "text", "versionId": "v1", "arn": ARN, "fetchedAt": "2025-01-01T00:00:00Z"}
    credential = parse_watch_line(json.dumps({"status": 200, "credential": document}).encode(), "ns", "n")
    assert isinstance(credential, Credential) and (credential.value, credential.version_id) == (VALUE, "v1")
    error = {"reason": "Throttled", "message": "AWS throttled"}
    unavailable = parse_watch_line(json.dumps({"status": 503, "error": error}).encode(), "ns", "n")
    assert isinstance(unavailable, CredentialUnavailable) and unavailable.transient
    assert (unavailable.reason, unavailable.message, unavailable.status) == ("Throttled", "AWS throttled", 503)
    missing = parse_watch_line(b'{"status": 404, "error": {"reason": "NotFound", "message": "m"}}', "ns", "n")
    assert isinstance(missing, CredentialNotFound)
    for line in (b"{", b"[]", b'{"status": "200"}', b'{"status": 200}', b'{"status": 503, "error": "x"}'):
        with pytest.raises(ProtocolError):
            parse_watch_line(line, "ns", "n")
    with pytest.raises(ProtocolError) as raised:
        parse_watch_line(b'{"status": 200, "credential": {"value": "' + VALUE.encode() + b'"', "ns", "n")
    assert VALUE not in str(raised.value) and raised.value.__context__ is None


# --------------------------------------------------------------------------- against the server


class Operator:
    """The real socket server and engine (one credential, ns/n... team-a/slack, read through a fake
    port), started and stopped on an event loop in a thread of its own, like a sidecar restarting."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.port = FakePort()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._running: tuple[Engine, CredentialServer] | None = None

    def _call(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)

    def start(self) -> None:
        async def start() -> None:
            settings = OperatorSettings(socket_path=self.path, watch_heartbeat=0.5, min_refresh_gap=0)
            engine = Engine(settings, self.port, FakeSink())
            engine.upsert(body({"secretArn": ARN}))
            engine.synced.set()
            server = CredentialServer(settings, engine, lambda: True)
            await server.start()
            self._running = (engine, server)

        self._call(start)

    def stop(self) -> None:
        async def stop() -> None:
            assert self._running is not None
            engine, server = self._running
            await engine.drain()
            await server.close()
            await engine.close()
            self._running = None

        self._call(stop)

    def rotate(self, version: str, value: str) -> None:
        self.port.answer = FetchedSecret(version, value, ("AWSCURRENT",))

        async def refresh() -> None:
            assert self._running is not None
            await self._running[0].serve("team-a", "slack", refresh=True)

        self._call(refresh)

    def remove(self) -> None:
        async def remove() -> None:
            assert self._running is not None
            self._running[0].remove("team-a", "slack")

        self._call(remove)

    def close(self) -> None:
        if self._running is not None:
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ccw-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_watch_waits_for_the_operator_follows_changes_and_survives_restarts(kind: str, sock_dir: Path) -> None:
    path = str(sock_dir / "s.sock")
    operator = Operator(path)
    watcher = Watcher(kind, path, "team-a", "slack")
    try:
        absent = watcher.next()
        assert isinstance(absent, ServerUnreachable) and "does not exist" in absent.message
        assert not watcher.watch.started  # the CLI exits on this one
        assert watcher.none_within(0.6), "the same error is yielded once, not at every retry"
        operator.start()
        first = watcher.next()
        assert isinstance(first, Credential) and (first.value, first.version_id) == (VALUE, "v1")
        assert watcher.watch.started
        operator.rotate("v2", "second")
        assert _version(watcher.next()) == ("second", "v2")
        assert watcher.none_within(1.2), "heartbeats are not items"

        # A restart: the stream ends cleanly, the socket goes, a new operator serves a newer version.
        operator.stop()
        assert isinstance(watcher.next(), ServerUnreachable)
        operator.port.answer = FetchedSecret("v3", "third", ("AWSCURRENT",))
        operator.start()
        assert _version(watcher.next()) == ("third", "v3")
        # A restart that finds nothing changed: only the outage in between is news.
        operator.stop()
        assert isinstance(watcher.next(), ServerUnreachable)
        operator.start()
        assert _version(watcher.next()) == ("third", "v3")

        operator.remove()
        missing = watcher.next()
        assert isinstance(missing, CredentialNotFound) and missing.status == 404
    finally:
        watcher.close()
        operator.close()


def _version(item: Item) -> tuple[str, str]:
    assert isinstance(item, Credential), item
    return item.value, item.version_id


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_operator_that_does_not_stream_is_a_protocol_error(kind: str, sock_dir: Path) -> None:
    path = str(sock_dir / "old.sock")

    async def plain(request: web.BaseRequest) -> web.StreamResponse:
        fetched = "2025-01-01T00:00:00Z"
        document = {"value": VALUE, "encoding": "text", "versionId": "v1", "arn": ARN, "fetchedAt": fetched}
        return web.json_response(document)

    async def serve() -> web.ServerRunner:
        runner = web.ServerRunner(web.Server(plain))
        await runner.setup()
        await web.UnixSite(runner, path).start()
        return runner

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(serve(), loop).result(5)
    watcher = Watcher(kind, path, "team-a", "slack")
    try:
        error = watcher.next()
        assert isinstance(error, ProtocolError) and "does not stream" in error.message
        assert not watcher.watch.started and VALUE not in str(error)
    finally:
        watcher.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
