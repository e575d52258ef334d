"""HTTP/1.1 on the operator's Unix socket, as much of it as the clients need (standard library only).

Both clients in :mod:`connector_credentials.client` go through here, so they frame requests
and read answers the same way. The operator's server (``adapters/socket/server.py``, bodies from ``api/wire.py``)
always answers a GET with a Content-Length and a JSON body, so that is the only framing read
here. A chunked answer, or one that runs to the end of the connection, means something
other than the operator is answering: it is refused as :class:`Malformed` at once, before
any body byte is read, rather than guessed at.

Nothing here knows about credentials. The clients turn :class:`Malformed` and
:class:`Dropped` (and ``OSError``/``TimeoutError``) into their typed errors.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncio

#: Largest response body accepted (a secret is at most 64 KiB; lists can be longer).
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
#: Largest status line plus headers accepted; the operator's are a few hundred bytes.
MAX_HEAD_BYTES: Final = 64 * 1024
_MAX_HEADER_LINES: Final = 100
_RECV_BYTES: Final = 65536
_END_OF_HEAD: Final = b"\r\n\r\n"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_TRUNCATED: Final = "the server closed the connection in the middle of an answer"

_REQUEST: Final = (
    "GET {target} HTTP/1.1\r\n"
    "Host: localhost\r\n"
    "Accept: application/json\r\n"
    "User-Agent: connector-credentials-client/0.1\r\n"
    "\r\n"
)


class Malformed(Exception):
    """The answer is not HTTP this client can use. The message never holds body bytes."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Dropped(Exception):
    """The server closed (or reset) the connection before any byte of an answer."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer. ``headers`` keys are lowercase; repeated headers are joined with ", "."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    keep_alive: bool = False

    def __repr__(self) -> str:
        # The body may hold a secret value.
        return f"Response(status={self.status}, body=<{len(self.body)} bytes>)"


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    headers: dict[str, str]
    length: int
    keep_alive: bool


def _request(target: str) -> bytes:
    return _REQUEST.format(target=target).encode("ascii")


def _parse_head(head: bytes) -> _Head:
    """Status line and headers (without the blank line), checked down to a usable Content-Length."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.0", "HTTP/1.1")
        or not (len(code) == 3 and code.isascii() and code.isdigit())
        or rest[3:4] not in ("", " ")
    ):
        raise Malformed(f"malformed HTTP status line {status_line[:80]!r}")
    status = int(code)
    if len(lines) > _MAX_HEADER_LINES:
        raise Malformed("the server sent too many header lines", status)
    headers: dict[str, str] = {}
    for line in lines:
        key, sep, item = line.partition(":")
        key, item = key.lower(), item.strip()
        if not sep or not _TOKEN.fullmatch(key):
            raise Malformed(f"malformed HTTP header line {line[:80]!r}", status)
        if key == "content-length" and headers.get(key, item) != item:
            raise Malformed("conflicting Content-Length headers", status)
        headers[key] = f"{headers[key]}, {item}" if key in headers and key != "content-length" else item
    if status < 200:
        raise Malformed(f"unexpected informational HTTP {status} answer", status)
    # Checked before Content-Length: an answer with both is exactly the ambiguity to refuse.
    if "transfer-encoding" in headers:
        shown = headers["transfer-encoding"][:40]
        raise Malformed(
            f"the answer uses Transfer-Encoding {shown!r}; the operator always sends Content-Length "
            "(is something else listening on the socket?)",
            status,
        )
    length = headers.get("content-length")
    if length is None:
        raise Malformed(
            "the answer has no Content-Length; the operator always sends one "
            "(is something else listening on the socket?)",
            status,
        )
    if not (length.isascii() and length.isdigit()):
        raise Malformed(f"malformed Content-Length {length[:40]!r}", status)
    if int(length) > MAX_BODY_BYTES:
        raise Malformed(f"the server's answer is too large ({length} bytes)", status)
    connection = [token.strip().lower() for token in headers.get("connection", "").split(",")]
    return _Head(status, headers, int(length), version == "HTTP/1.1" and "close" not in connection)


def _connect_once(path: str, timeout: float | None) -> socket.socket | None:
    """A socket connected to ``path``, or None when the listen backlog is full.

    A full backlog fails a Unix connect at once with EAGAIN; the callers wait for room
    and try again, within their timeout, rather than give up.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """One blocking keep-alive connection; ``timeout`` bounds each socket operation."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls, path: str, timeout: float | None, backlog_wait: float) -> Connection:
        """Connect, waiting up to ``backlog_wait`` seconds for room in a full listen backlog."""
        deadline = time.monotonic() + backlog_wait
        delay = 0.005
        while (sock := _connect_once(path, timeout)) is None:
            if time.monotonic() + delay > deadline:
                raise TimeoutError("the operator's listen backlog stayed full")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def exchange(self, target: str) -> Response:
        """Send a GET and read the whole answer."""
        try:
            self._sock.sendall(_request(target))
            buffer = bytearray(self._sock.recv(_RECV_BYTES))
        except (BrokenPipeError, ConnectionResetError):
            raise Dropped from None
        if not buffer:
            raise Dropped
        while (end := buffer.find(_END_OF_HEAD)) < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise Malformed("the server sent an over-long HTTP head")
            buffer += self._recv()
        head = _parse_head(bytes(buffer[:end]))
        del buffer[: end + len(_END_OF_HEAD)]
        while len(buffer) < head.length:
            buffer += self._recv()
        # Bytes past the body are framing this client does not know: do not reuse the connection.
        keep_alive = head.keep_alive and len(buffer) == head.length
        return Response(head.status, head.headers, bytes(buffer[: head.length]), keep_alive)

    def _recv(self) -> bytes:
        chunk = self._sock.recv(_RECV_BYTES)
        if not chunk:
            raise Malformed(_TRUNCATED)
        return chunk


class AsyncConnection:
    """One keep-alive connection over asyncio streams; the caller bounds the time it takes."""

    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: str) -> AsyncConnection:
        """Connect, waiting for room in a full listen backlog (the caller's timeout bounds the wait)."""
        import asyncio  # here, not at the top: the synchronous client (and the CLI) never pay for it

        delay = 0.005
        # Connected here, not by asyncio: its sock_connect takes EAGAIN for "in progress" and
        # hands back a socket that never connected, so a full backlog would look like a hang-up.
        while (sock := _connect_once(path, 0.0)) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_HEAD_BYTES)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        return not self._reader.at_eof() and not self._writer.is_closing() and self._reader.exception() is None

    def abort(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, RuntimeError):  # already reset, or the loop is going away
            pass

    async def exchange(self, target: str) -> Response:
        """Send a GET and read the whole answer."""
        import asyncio  # already loaded: an AsyncConnection exists only on a running loop

        self._writer.write(_request(target))
        try:
            await self._writer.drain()
            raw_head = await self._reader.readuntil(_END_OF_HEAD)
        except (BrokenPipeError, ConnectionResetError):
            raise Dropped from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise Dropped from None
            failure = _TRUNCATED
        except asyncio.LimitOverrunError:
            failure = "the server sent an over-long HTTP head"
        else:
            head = _parse_head(raw_head[: -len(_END_OF_HEAD)])
            try:
                body = await self._reader.readexactly(head.length)
            except asyncio.IncompleteReadError:
                failure = _TRUNCATED
            except ConnectionResetError:
                failure = "the connection was reset in the middle of an answer"
            else:
                return Response(head.status, head.headers, body, head.keep_alive)
        # Raised outside the ``except``: a partial read (maybe a value) must not stay reachable as context.
        raise Malformed(failure)
