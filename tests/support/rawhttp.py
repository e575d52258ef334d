"""Raw HTTP/1.1 over the operator's Unix socket: status lines and headers exactly as sent, from
this process or from another uid. For tests that must see the wire, not the client's reading of it.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: A uid that is never in CCRED_ALLOWED_UIDS.
NOBODY = 65534


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Reply:
    """One HTTP answer as read off the socket; ``status`` is None when the server closed silently."""

    status: int | None
    version: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def __repr__(self) -> str:  # bodies may hold values: never print them in assertion messages
        return f"Reply(status={self.status}, version={self.version!r}, {len(self.body)} body bytes)"


def parse_reply(data: bytes) -> Reply:
    """The first HTTP response in ``data`` (head, then Content-Length bytes of body)."""
    if not data:
        return Reply(None)
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"(HTTP/\d\.\d) (\d{3})", lines[0])
    assert match, f"not an HTTP status line: {lines[0][:80]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    body = rest[: int(length)] if length is not None else rest
    return Reply(int(match.group(2)), match.group(1), headers, body, data)


def _complete(data: bytes, head_only: bool) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return match is not None and len(rest) >= int(match.group(1))


def exchange(socket_path: str, data: bytes, *, timeout: float = 10.0, head_only: bool = False) -> Reply:
    """Send raw bytes; read one complete answer, or until the server closes.

    Never hangs: no answer and no close within ``timeout`` fails the test.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything; read what it said
        received = b""
        try:
            while not _complete(received, head_only):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"no complete answer and no close within {timeout}s for {data[:60]!r} (got {len(received)} bytes)"
            ) from None
    return parse_reply(received)


def request(
    socket_path: str, target: str, method: str = "GET", headers: Iterable[tuple[str, str]] = (), **kwargs: Any
) -> Reply:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return exchange(socket_path, data, head_only=method == "HEAD", **kwargs)


def assert_error(reply: Reply, status: int, reason: str | None = None) -> dict[str, Any]:
    """The documented error shape, with no-store."""
    assert reply.status == status, (reply, reply.body[:300])
    assert reply.headers.get("cache-control") == "no-store", reply.headers
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"reason", "message"}, error
    assert isinstance(error["message"], str) and error["message"]
    if reason is not None:
        assert error["reason"] == reason, error
    return dict(error)


# --------------------------------------------------------------------------- another uid

# The interpreter lives under /root (0700): start as root, then drop to the uid before connecting.
# SO_PEERCRED reports the credentials of connect(), so the server sees the dropped uid.
_AS_UID = r"""
import json, os, socket, sys
path, uid, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
os.setgroups([0]); os.setgid(0); os.setuid(uid)
answers = []
for target in targets:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answers.append(data.decode("latin-1"))
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "answers": answers}))
"""


def as_uid(socket_path: str, uid: int, *targets: str) -> tuple[int, list[Reply]]:
    """GET ``targets`` from a process running as ``uid`` (group 0); return its pid and the replies."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _AS_UID, socket_path, str(uid), *targets],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["uid"] == uid
    return result["pid"], [parse_reply(answer.encode("latin-1")) for answer in result["answers"]]
