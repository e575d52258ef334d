"""A watch stream (``?watch=true``) read raw off the operator's Unix socket, in a thread of its own:
the head as sent, every line with the moment it arrived, and how the stream ended. For tests that
must see the wire (chunks, heartbeats, the last zero-length chunk), not the client's reading of it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

T = TypeVar("T")

#: How a stream ended: its zero-length chunk, then the close ("clean"); a close without it ("closed");
#: a reset ("reset"); or it is still open (None).
CLEAN, CLOSED, RESET = "clean", "closed", "reset"


@dataclass(frozen=True)
class Line:
    """One line of the body (``b""``: a heartbeat) and when it arrived (``time.monotonic()``)."""

    at: float
    data: bytes

    def document(self) -> Any:
        return json.loads(self.data)

    def __repr__(self) -> str:  # lines may hold values: never print them in assertion messages
        return f"Line(at={self.at:.3f}, {len(self.data)} bytes)"


@dataclass
class WatchStream:
    """``GET target`` on ``socket_path``, read in a thread (unless ``read`` is False: the request is
    sent and nothing is ever read, as a client that stopped reading)."""

    socket_path: str
    target: str
    read: bool = True
    timeout: float = 120.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    end: str | None = None
    #: When the request was sent, and when the stream ended (``time.monotonic()``).
    sent_at: float = 0.0
    ended_at: float | None = None
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __repr__(self) -> str:
        return f"WatchStream({self.target}, status {self.status}, {len(self.lines)} lines, end {self.end})"

    def start(self) -> Self:
        sock = self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sent_at = time.monotonic()
        sock.sendall(f"GET {self.target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        if self.read:
            self._thread = threading.Thread(target=self._read, name="watch-stream", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)

    # --- what arrived ------------------------------------------------------------------

    def documents(self) -> list[Any]:
        """Every line that is not a heartbeat, parsed."""
        with self._changed:
            return [line.document() for line in self.lines if line.data]

    def heartbeats(self) -> list[Line]:
        with self._changed:
            return [line for line in self.lines if not line.data]

    def wait(self, predicate: Callable[[WatchStream], T], timeout: float = 10.0, message: str = "") -> T:
        """Until ``predicate(self)`` is truthy (re-checked at each line and at the end); return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = predicate(self)
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{message or 'the watch stream never got there'} within {timeout:.1f}s: "
                        f"status {self.status}, {len(self.lines)} lines, end {self.end}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def wait_documents(self, count: int, timeout: float = 10.0) -> list[Any]:
        self.wait(lambda s: len([line for line in s.lines if line.data]) >= count, timeout, f"{count} lines")
        return self.documents()

    def wait_end(self, timeout: float = 10.0) -> str:
        self.wait(lambda s: s.end, timeout, "the stream did not end")
        assert self.end is not None
        return self.end

    def read_to_end(self, timeout: float = 10.0) -> tuple[str, int]:
        """For a stream that was not read: read what the kernel holds until the server's end shows;
        how it ended (``CLOSED``: a close without the last chunk, ``CLEAN``: after it, ``RESET``) and
        how many bytes arrived. Fails if the server keeps the connection open ``timeout`` seconds."""
        assert self._sock is not None and not self.read
        self._sock.settimeout(timeout)
        received = bytearray()
        try:
            while chunk := self._sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return RESET, len(received)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open for {timeout}s") from None
        return (CLEAN if received.endswith(b"\r\n0\r\n\r\n") else CLOSED), len(received)

    # --- the reading thread ------------------------------------------------------------

    def _read(self) -> None:
        assert self._sock is not None
        buffer = bytearray()
        end = RESET
        try:
            end = self._parse(buffer)
        except (ConnectionResetError, BrokenPipeError):
            end = RESET
        except (OSError, ValueError):
            end = RESET if self.end is None else self.end
        finally:
            with self._changed:
                self.end, self.ended_at = end, time.monotonic()
                self._changed.notify_all()

    def _more(self, buffer: bytearray) -> bool:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        buffer += chunk
        return bool(chunk)

    def _parse(self, buffer: bytearray) -> str:
        while b"\r\n\r\n" not in buffer:
            if not self._more(buffer):
                return CLOSED
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        with self._changed:
            self.status = int(status_line.split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
            self._changed.notify_all()
        if "chunked" not in self.headers.get("transfer-encoding", ""):
            while self._more(buffer):
                pass
            return CLOSED
        partial = bytearray()
        while True:
            while b"\r\n" not in buffer:
                if not self._more(buffer):
                    return CLOSED
            size_line, _, rest = bytes(buffer).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            buffer[:] = rest
            while len(buffer) < size + 2:
                if not self._more(buffer):
                    return CLOSED
            data, buffer[:] = bytes(buffer[:size]), buffer[size + 2 :]
            if size == 0:
                # The last chunk: a clean end once the server closes (nothing may follow it).
                while self._more(buffer):
                    pass
                return CLEAN if not buffer else CLOSED
            partial += data
            while b"\n" in partial:
                text, _, remainder = bytes(partial).partition(b"\n")
                partial[:] = remainder
                with self._changed:
                    self.lines.append(Line(time.monotonic(), text))
                    self._changed.notify_all()
