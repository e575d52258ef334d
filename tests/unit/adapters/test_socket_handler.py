"""What the socket's connection handler borrows from aiohttp's private API, held to its meaning.

``server._Handler`` subclasses aiohttp's ``RequestHandler`` and reads two of its private
attributes (aiohttp offers no public hook for either; see the comment on ``_Handler``):

* ``_request_count``: how many request heads the parser has completed on the connection (a parse
  error, answered 400, counts as one). A change of it in ``data_received`` is how the server
  learns that a request head arrived: the head deadline stops, and the connection is busy.
* ``_messages``: the requests parsed and not yet handled (pipelined behind the one in hand).
  When a request is answered, the connection is idle only if this is empty.

aiohttp is pinned in constraints.txt (and the image installs with it). If an aiohttp upgrade
renames these or changes what they mean, these tests fail: the connection limit would then close
busy connections, or never close idle ones.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp.web_protocol import RequestHandler

from connector_credentials.adapters.metrics.prometheus import Metrics
from connector_credentials.adapters.socket.server import CredentialServer, _Handler
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.entry import Served


def test_aiohttp_request_handler_still_has_the_private_attributes_the_server_reads() -> None:
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    assert {"_request_count", "_messages"} <= slots, "aiohttp's RequestHandler changed: see server._Handler"


class HeldEngine:
    """The part of the engine the server calls; each read waits until the test releases its name."""

    metrics = Metrics()

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.reading: list[str] = []

    def cached_body(self, namespace: str, name: str) -> bytes | None:
        return None

    def describe(self) -> list[dict[str, Any]]:
        return []

    async def serve(self, namespace: str, name: str, *, refresh: bool) -> Served:
        self.reading.append(name)
        await self.gates[name].wait()
        return Served(404, reason="NotFound", message="not declared")


def request(name: str) -> bytes:
    return f"GET /v1/credentials/ns/{name} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


async def until(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.005)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n", 1)[0]


async def test_busy_and_idle_follow_keep_alive_and_pipelined_requests(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    engine = HeldEngine()
    server = CredentialServer(OperatorSettings(socket_path=str(path)), engine, lambda: True)  # type: ignore[arg-type]
    await server.start()
    table = server._policy.table
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await until(lambda: len(table) == 1, "the connection was not admitted")
        [handler] = list(table._idle)
        assert isinstance(handler, _Handler)
        counted = handler._request_count

        # Half a head: no request yet.
        head = request("a")
        writer.write(head[:20])
        await writer.drain()
        await until(lambda: handler._head_timer is not None, "the head deadline was not armed")
        assert handler._request_count == counted and not table.is_busy(handler)

        # The rest of it, and a second request pipelined behind it, in one write.
        writer.write(head[20:] + request("b"))
        await writer.drain()
        await until(lambda: engine.reading == ["a"], "the first request was not handled")
        assert handler._request_count == counted + 2  # one per head
        assert len(handler._messages) == 1  # "b" waits behind "a"
        assert table.is_busy(handler) and handler._head_timer is None

        # "a" answered while "b" waits: still busy (an idle connection may be closed to make room).
        engine.gates["a"].set()
        assert await read_answer(reader) == b"HTTP/1.1 404 Not Found"
        await until(lambda: engine.reading == ["a", "b"], "the pipelined request was not handled")
        assert table.is_busy(handler), "idle while a pipelined request was in hand"

        # "b" answered, nothing behind it: idle.
        engine.gates["b"].set()
        assert await read_answer(reader) == b"HTTP/1.1 404 Not Found"
        await until(lambda: not table.is_busy(handler), "still busy after the last answer")
        assert not handler._messages

        # The next request on the kept-alive connection: busy again until answered, then idle.
        writer.write(request("c"))
        await writer.drain()
        await until(lambda: engine.reading[-1:] == ["c"], "the kept-alive request was not handled")
        assert handler._request_count == counted + 3 and table.is_busy(handler)
        engine.gates["c"].set()
        assert await read_answer(reader) == b"HTTP/1.1 404 Not Found"
        await until(lambda: not table.is_busy(handler), "still busy after the kept-alive answer")
    finally:
        for gate in engine.gates.values():
            gate.set()
        writer.close()
        await server.close()


async def test_a_malformed_head_counts_as_a_request_and_is_answered_400(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = CredentialServer(OperatorSettings(socket_path=str(path)), HeldEngine(), lambda: True)  # type: ignore[arg-type]
    await server.start()
    table = server._policy.table
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await until(lambda: len(table) == 1, "the connection was not admitted")
        [handler] = list(table._idle)
        counted = handler._request_count
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # the 400 closes the connection
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:40]
        assert handler._request_count == counted + 1  # what stopped the head deadline and made it busy
    finally:
        writer.close()
        await server.close()
