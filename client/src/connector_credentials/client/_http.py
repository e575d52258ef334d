"""HTTP/1.1 on the operator's Unix socket, as much of it as the clients need (standard library only).

Both clients in :mod:`connector_credentials.client` go through here, so they frame requests
and read answers the same way. The operator's server (``adapters/socket/server.py``, bodies from ``api/wire.py``)
always answers a GET with a Content-Length and a JSON body, so that is the only framing read
here for a request. A chunked answer, or one that runs to the end of the connection, means
something other than the operator is answering: it is refused as :class:`Malformed` at once,
before any body byte is read, rather than guessed at. The one exception is a watch
(``?watch=true``, :meth:`Connection.open_stream`): its 200 is chunked, read as it arrives
through :class:`Chunks`; any other answer to it is read as a request's.

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
    "Accept: {accept}\r\n"
    "User-Agent: connector-credentials-client/0.1\r\n"
    "\r\n"
)
#: A chunk-size line is a few hex digits; anything much longer is not the operator's.
_MAX_CHUNK_SIZE_LINE: Final = 64


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
class StreamHead:
    """The head of a chunked answer whose body is read as it arrives. ``headers`` keys are lowercase."""

    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Head:
    status: int
    headers: dict[str, str]
    length: int
    keep_alive: bool


def _request(target: str, accept: str = "application/json") -> bytes:
    return _REQUEST.format(target=target, accept=accept).encode("ascii")


def _chunked(head: bytes) -> StreamHead | None:
    """The head of a chunked answer (only ``chunked``, nothing else), or ``None`` for any other."""
    version, status, headers = _status_and_headers(head)
    coding = headers.get("transfer-encoding")
    if version != "HTTP/1.1" or coding is None or coding.strip().lower() != "chunked" or "content-length" in headers:
        return None
    return StreamHead(status, headers)


def _status_and_headers(head: bytes) -> tuple[str, int, dict[str, str]]:
    """The HTTP version, the status and the headers (keys lowercase) of a head without its blank line."""
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
    return version, status, headers


def _parse_head(head: bytes) -> _Head:
    """Status line and headers (without the blank line), checked down to a usable Content-Length."""
    version, status, headers = _status_and_headers(head)
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


class Chunks:
    """A chunked body decoded as it arrives into the lines it carries (``b""`` for an empty line).

    :meth:`feed` takes bytes off the socket and returns the lines they completed; ``ended`` is set
    by the last, zero-length chunk (trailers are not sent by the operator and are refused). A line
    longer than ``max_line`` bytes, or broken framing, raises :class:`Malformed`, whose message
    never quotes the body.
    """

    __slots__ = ("_buffer", "_left", "_line", "_max_line", "ended")

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._line = bytearray()
        #: Bytes of the current chunk still to come; None while a chunk-size line is expected; -1
        #: while the CRLF that closes a chunk is, -2 while the one after the last chunk is.
        self._left: int | None = None
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.ended:
            raise Malformed("the server sent bytes after the end of a chunked answer")
        self._buffer += data
        lines: list[bytes] = []
        while self._buffer and not self.ended:
            if self._left is None:
                if not self._size_line():
                    break
            elif self._left < 0:
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    # After the last chunk: a trailer, which the operator never sends.
                    raise Malformed("malformed chunked framing: no CRLF after a chunk")
                del self._buffer[:2]
                self.ended, self._left = self._left == -2, None
            else:
                taken = self._buffer[: self._left]
                del self._buffer[: len(taken)]
                self._left -= len(taken)
                self._take(taken, lines)
                if self._left == 0:
                    self._left = -1
        return lines

    def _size_line(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_CHUNK_SIZE_LINE:
                raise Malformed("malformed chunked framing: an over-long chunk-size line")
            return False
        size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Malformed("malformed chunked framing: a chunk size that is not hexadecimal")
        del self._buffer[: end + 2]
        size = int(size_text, 16)
        self._left = size if size else -2  # the last chunk: the blank line that ends the answer follows
        return True

    def _take(self, data: bytearray, lines: list[bytes]) -> None:
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            self._line += data[start:newline]
            lines.append(bytes(self._line))
            self._line.clear()
            start = newline + 1
        self._line += data[start:]
        if len(self._line) > self._max_line:
            raise Malformed(f"the server sent a line longer than {self._max_line} bytes")


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
        raw_head, buffer = self._send_and_read_head(target, "application/json")
        return self._read_body(_parse_head(raw_head), buffer)

    def open_stream(self, target: str, accept: str, timeout: float | None) -> tuple[StreamHead, bytes] | Response:
        """Send a GET for a chunked answer: its head and the body bytes read with it, or (any other
        answer) the whole answer. ``timeout`` bounds each socket operation from now on."""
        self._sock.settimeout(timeout)
        raw_head, buffer = self._send_and_read_head(target, accept)
        stream = _chunked(raw_head)
        if stream is not None:
            return stream, bytes(buffer)
        return self._read_body(_parse_head(raw_head), buffer)

    def receive(self) -> bytes:
        """What arrived next (``b""``: the server closed)."""
        return self._sock.recv(_RECV_BYTES)

    def interrupt(self) -> None:
        """From another thread: a read blocked on this connection returns ``b""`` at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more: nothing blocks on it

    def _send_and_read_head(self, target: str, accept: str) -> tuple[bytes, bytearray]:
        try:
            self._sock.sendall(_request(target, accept))
            buffer = bytearray(self._sock.recv(_RECV_BYTES))
        except (BrokenPipeError, ConnectionResetError):
            raise Dropped from None
        if not buffer:
            raise Dropped
        while (end := buffer.find(_END_OF_HEAD)) < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise Malformed("the server sent an over-long HTTP head")
            buffer += self._recv()
        raw_head = bytes(buffer[:end])
        del buffer[: end + len(_END_OF_HEAD)]
        return raw_head, buffer

    def _read_body(self, head: _Head, buffer: bytearray) -> Response:
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
        raw_head = await self._send_and_read_head(target, "application/json")
        return await self._read_body(_parse_head(raw_head))

    async def open_stream(self, target: str, accept: str) -> StreamHead | Response:
        """Send a GET for a chunked answer: its head (the body is read with :meth:`receive`), or
        (any other answer) the whole answer."""
        raw_head = await self._send_and_read_head(target, accept)
        stream = _chunked(raw_head)
        return stream if stream is not None else await self._read_body(_parse_head(raw_head))

    async def receive(self) -> bytes:
        """What arrived next (``b""``: the server closed)."""
        return await self._reader.read(_RECV_BYTES)

    async def _send_and_read_head(self, target: str, accept: str) -> bytes:
        import asyncio  # already loaded: an AsyncConnection exists only on a running loop

        self._writer.write(_request(target, accept))
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
            return raw_head[: -len(_END_OF_HEAD)]
        raise Malformed(failure)

    async def _read_body(self, head: _Head) -> Response:
        import asyncio

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
