"""Watch streams (``?watch=true``): what counts as a change, the line format, and a stream served by
the real socket server from a real engine (a fake AWS port), read raw off the socket."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connector_credentials.adapters.socket.responses import render
from connector_credentials.adapters.socket.server import CredentialServer
from connector_credentials.adapters.socket.watch import says
from connector_credentials.api.values import SecretValue
from connector_credentials.api.wire import error_body, render_credential, watch_line
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.entry import Served
from connector_credentials.core.ports import FetchedSecret, NoMeter
from tests.support.fakes import ARN, VALUE, FakePort, FakeSink, body
from tests.support.watchstream import CLEAN, WatchStream

NOW = datetime.datetime(2025, 6, 2, 9, 14, 7, tzinfo=datetime.UTC)
TARGET = "/v1/credentials/team-a/slack?watch=true"


def _value(text: str | bytes, version: str = "v1", fetched: datetime.datetime = NOW) -> Served:
    value = SecretValue(text)
    return Served(
        200,
        value=value,
        version_id=version,
        arn=ARN,
        fetched_at=fetched,
        body=render_credential(value, version, ARN, fetched),
    )


def _error(status: int, reason: str, message: str = "m") -> Served:
    return Served(status, reason=reason, message=message, retry_after=1 if status == 503 else None)


# --------------------------------------------------------------------------- what is a change


def test_a_new_fetch_of_the_same_version_or_a_new_message_is_not_a_change() -> None:
    assert says(_value("a")) == says(_value("a", fetched=NOW + datetime.timedelta(minutes=5)))
    assert says(_error(503, "Throttled", "retry 1")) == says(_error(503, "Throttled", "retry 2 in 4s"))
    assert says(_error(502, "AccessDenied", "x")) == says(_error(502, "AccessDenied", "y"))


def test_the_value_the_version_the_status_and_the_reason_are_changes() -> None:
    base = says(_value("a"))
    assert says(_value("b")) != base
    assert says(_value("a", version="v2")) != base
    assert says(_value(b"a")) != base  # the same bytes, binary instead of text
    assert says(_error(503, "Throttled")) != says(_error(503, "AWSUnavailable"))
    assert says(_error(503, "Pending")) != says(_error(404, "Pending"))
    assert says(_error(404, "NotFound")) != base


def test_what_a_stream_remembers_holds_no_value() -> None:
    said = says(_value(VALUE))
    assert VALUE not in repr(said) and VALUE.encode() not in said.value  # type: ignore[operator]


# --------------------------------------------------------------------------- the line


def test_a_line_is_the_plain_answer_with_its_status() -> None:
    served = _value(VALUE)
    rendered = render(served)
    text = watch_line(rendered.status, rendered.body)
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    assert json.loads(text) == {"status": 200, "credential": json.loads(rendered.body)}
    assert rendered.body in text  # the rendered bytes as they are, not parsed and dumped again
    failed = render(_error(503, "Throttled", 'line\nbreak "quoted"'))
    assert failed.body == error_body("Throttled", 'line\nbreak "quoted"').encode()
    line = watch_line(failed.status, failed.body)
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"status": 503, **json.loads(failed.body)}
    assert VALUE not in repr(rendered)


# --------------------------------------------------------------------------- a served stream


class Counted(NoMeter):
    def __init__(self) -> None:
        self.answered: list[int] = []

    def socket_answered(self, code: int, seconds: float) -> None:
        self.answered.append(code)


class Serving:
    """An engine with one credential (team-a/slack, read through a fake port) and its socket server."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.path = str(tmp_path / "s.sock")
        self.settings = OperatorSettings(socket_path=self.path, min_refresh_gap=0, **settings)
        self.port = FakePort()
        self.meter = Counted()
        self.engine = Engine(self.settings, self.port, FakeSink(), metrics=self.meter)
        self.server = CredentialServer(self.settings, self.engine, lambda: True)

    async def rotate(self, version: str, value: str | bytes) -> None:
        self.port.answer = FetchedSecret(version, value, ("AWSCURRENT",))
        served = await self.engine.serve("team-a", "slack", refresh=True)
        assert served.version_id == version

    def watch(self, target: str = TARGET, *, read: bool = True) -> WatchStream:
        return WatchStream(self.path, target, read=read, timeout=30).start()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Serving]:
    world = Serving(tmp_path, watch_heartbeat=0.4)
    world.engine.upsert(body({"secretArn": ARN}))
    world.engine.synced.set()
    await world.server.start()
    try:
        yield world
    finally:
        await world.server.close()
        await world.engine.close()


async def _wait(stream: WatchStream, count: int) -> list[Any]:
    return await asyncio.to_thread(stream.wait_documents, count)


async def test_a_stream_says_the_answer_then_each_change_then_ends_cleanly(served: Serving) -> None:
    stream = await asyncio.to_thread(served.watch)
    (first,) = await _wait(stream, 1)
    assert (stream.status, stream.headers["content-type"]) == (200, "application/x-ndjson")
    assert stream.headers["transfer-encoding"] == "chunked" and stream.headers["cache-control"] == "no-store"
    plain = render(served.engine.current("team-a", "slack"))
    assert first == {"status": 200, "credential": json.loads(plain.body)}
    assert first["credential"]["value"] == VALUE
    assert served.meter.answered == [200]  # counted once, when its first line is out

    await served.rotate("v2", "rotated")
    documents = await _wait(stream, 2)
    assert (documents[1]["credential"]["versionId"], documents[1]["credential"]["value"]) == ("v2", "rotated")
    await served.rotate("v2", "rotated")  # read again, same version: a new fetchedAt, not a change
    await asyncio.to_thread(stream.wait, lambda s: len(s.heartbeats()) >= 2, 3.0)
    assert len(stream.documents()) == 2

    served.engine.remove("team-a", "slack")
    documents = await _wait(stream, 3)
    assert documents[2] == {
        "status": 404,
        "error": json.loads(render(served.engine.current("team-a", "slack")).body)["error"],
    }
    await served.server.close()
    assert await asyncio.to_thread(stream.wait_end) == CLEAN
    assert served.meter.answered == [200]  # nothing more when it ended
    stream.close()


async def test_heartbeats_come_a_heartbeat_interval_after_the_last_line(served: Serving) -> None:
    stream = await asyncio.to_thread(served.watch)
    await _wait(stream, 1)
    await asyncio.to_thread(stream.wait, lambda s: len(s.heartbeats()) >= 3, 5.0)
    times = [line.at for line in stream.lines]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(0.3 <= gap <= 1.0 for gap in gaps), gaps
    stream.close()


async def test_a_missed_notice_is_caught_up_by_the_next_heartbeat(served: Serving) -> None:
    stream = await asyncio.to_thread(served.watch)
    await _wait(stream, 1)
    # A change the engine did not announce (a notice lost): the heartbeat's re-evaluation sends it.
    entry = served.engine.get_entry("team-a", "slack")
    assert entry is not None
    entry.held.drop()
    documents = await _wait(stream, 2)
    assert documents[1]["status"] != 200
    stream.close()


async def test_streams_that_ended_leave_no_ticket_behind(served: Serving) -> None:
    streams = [
        await asyncio.to_thread(served.watch, f"/v1/credentials/team-a/undeclared-{index}?watch=true")
        for index in range(5)
    ]
    kept = await asyncio.to_thread(served.watch)
    for stream in [*streams, kept]:
        await _wait(stream, 1)
    assert len(served.engine.changes) == 6
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 5
    while len(served.engine.changes) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(served.engine.changes) == 1  # the stream still open keeps its own
    await asyncio.to_thread(kept.wait, lambda s: s.heartbeats(), 2.0)
    assert len(kept.documents()) == 1  # woken by the others' end, it found nothing to say
    kept.close()


async def test_a_head_and_malformed_watches(served: Serving) -> None:
    reader, writer = await asyncio.open_unix_connection(served.path)
    writer.write(b"HEAD " + TARGET.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"application/x-ndjson" in head
    writer.close()
    for request, status in (
        (f"GET {TARGET} HTTP/1.0\r\n\r\n", b"400"),
        ("GET /v1/credentials/team-a/slack?watch=maybe HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    ):
        reader, writer = await asyncio.open_unix_connection(served.path)
        writer.write(request.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split()[1] == status, head
        writer.close()
    reader, writer = await asyncio.open_unix_connection(served.path)
    writer.write(f"GET {TARGET.replace('true', 'False')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    plain = await asyncio.wait_for(reader.read(), 5)  # watch=false: a plain GET
    assert plain.startswith(b"HTTP/1.1 200") and b"application/json" in plain and b"chunked" not in plain
    writer.close()


async def test_a_stream_is_never_closed_to_make_room_and_counts_against_the_limit(tmp_path: Path) -> None:
    world = Serving(tmp_path, max_connections=2)
    world.engine.upsert(body({"secretArn": ARN}))
    world.engine.synced.set()
    await world.server.start()
    try:
        stream = await asyncio.to_thread(world.watch)
        await _wait(stream, 1)
        idle = []
        for _ in range(3):  # each new one takes the place of the idle one before it, never the stream's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(world.path)
            idle.append(sock)
            await asyncio.sleep(0.05)
        assert world.server._policy.report.totals["evicted"] == 2
        assert len(world.server._policy.table) == 2
        second = await asyncio.to_thread(world.watch)
        await _wait(second, 1)  # took the last idle one's place
        third = WatchStream(world.path, TARGET, timeout=5)
        await asyncio.to_thread(third.start)
        assert await asyncio.to_thread(third.wait_end) != CLEAN and third.status is None  # both busy: turned away
        assert world.server._policy.report.totals["turned_away"] == 1
        await world.rotate("v2", "still streamed")
        assert (await _wait(stream, 2))[1]["credential"]["versionId"] == "v2"
        assert (await _wait(second, 2))[1]["credential"]["versionId"] == "v2"
        for item in (stream, second, third, *idle):
            item.close()
    finally:
        await world.server.close()
        await world.engine.close()


async def test_a_client_that_does_not_read_is_given_up_within_a_heartbeat(served: Serving) -> None:
    big = "x" * 65_536
    stream = await asyncio.to_thread(served.watch, read=False)
    buffered = [0]  # what the operator holds for the stream, beyond what the kernel took
    for turn in range(40):
        await served.rotate(f"v{turn + 2}", f"{turn:02d}{big}")  # ~64 KiB a line, never read
        buffered += [s._request.transport.get_write_buffer_size() for s in served.server._watches._streams]  # type: ignore[union-attr]
        if served.server._policy.report.totals["stalled_watch"]:
            break
        await asyncio.sleep(0.02)
    deadline = time.monotonic() + 3
    while not served.server._policy.report.totals["stalled_watch"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert served.server._policy.report.totals["stalled_watch"] == 1, f"still writing after {turn + 1} lines"
    end, _ = await asyncio.to_thread(stream.read_to_end)
    assert end != CLEAN  # cut, not ended
    assert len(served.server._watches) == 0
    assert max(buffered) <= 256 * 1024, max(buffered)
    print(f"given up after {turn + 1} rotations; at most {max(buffered) // 1024} KiB buffered in the operator")
    stream.close()
