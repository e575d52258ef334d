"""The socket's accept-time policy (connections.py) alone, and through the server in this process.

The same behaviours are proven through the real operator in tests/integration/test_socket_hostile.py;
these cover the orderings and edge cases cheaply (which connection makes room, refused peers, the
rate-limited report, the file descriptor limit, the settings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from connector_credentials.adapters.metrics.prometheus import Metrics
from connector_credentials.adapters.socket import connections
from connector_credentials.adapters.socket import server as server_module
from connector_credentials.adapters.socket.connections import (
    ConnectionPolicy,
    ConnectionTable,
    Report,
    raise_fd_limit,
)
from connector_credentials.adapters.socket.server import CredentialServer
from connector_credentials.api.wire import closing_error
from connector_credentials.config.settings import OperatorSettings


class Fake:
    def __init__(self, name: str) -> None:
        self.name, self.evicted = name, False

    def evict(self) -> None:
        self.evicted = True

    def __repr__(self) -> str:
        return self.name


async def test_the_connection_idle_longest_makes_room_and_busy_ones_never_do() -> None:
    table = ConnectionTable(3, Report(3, 5.0))
    a, b, c, d, e, f = (Fake(n) for n in "abcdef")
    for conn in (a, b, c):
        assert table.admit(conn)
    table.busy(a)
    table.idle(a)  # answered: now idle the shortest
    assert table.admit(d) and b.evicted and not a.evicted
    table.busy(c)
    table.busy(d)
    assert table.admit(e) and a.evicted  # the only idle one
    table.busy(e)
    assert not table.admit(f) and not f.evicted  # all busy: the caller closes the new one
    assert len(table) == 3
    assert table.report.totals == {"evicted": 2, "turned_away": 1}
    table.discard(c)
    assert table.admit(f) and len(table) == 3
    table.report.close()


async def test_a_refused_peer_can_only_push_out_another_refused_one() -> None:
    table = ConnectionTable(2, Report(2, 5.0))
    allowed, refused, other_refused, newcomer = Fake("allowed"), Fake("refused"), Fake("other"), Fake("new")
    assert table.admit(allowed)
    assert table.admit(refused, refused=True)
    assert table.admit(other_refused, refused=True) and refused.evicted and not allowed.evicted
    assert table.admit(newcomer) and other_refused.evicted  # refused ones go first, even for allowed peers
    assert not table.admit(Fake("refused too"), refused=True)  # an allowed idle connection is not its to take
    assert not allowed.evicted
    assert table.report.totals == {"evicted": 2, "refused_at_limit": 1}
    table.report.close()


async def test_the_report_logs_the_first_at_once_and_sums_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=connections.__name__)
    report = Report(8, 1.0, interval=0.2)
    report.add("evicted")
    for _ in range(5):
        report.add("header_timeout")
    report.add("turned_away")
    assert len(caplog.records) == 1 and "1 idle to make room" in caplog.records[0].getMessage()
    deadline = time.monotonic() + 5
    while len(caplog.records) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    message = caplog.records[1].getMessage()
    assert "5 without a complete request head within 1s" in message and "1 new at once" in message
    assert caplog.records[1].levelno == logging.WARNING
    report.add("header_timeout")  # inside the next window: logged at close
    report.close()
    assert len(caplog.records) == 3 and caplog.records[2].levelno == logging.INFO


def test_fd_limit_is_raised_up_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_fd_limit(100) == 256  # enough already: left alone
        wanted = 2000 if hard == resource.RLIM_INFINITY else min(hard, 2000)
        assert raise_fd_limit(2000) == wanted == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = OperatorSettings()
    assert (settings.max_connections, settings.header_timeout) == (256, 5.0)
    monkeypatch.setenv("CCRED_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("CCRED_HEADER_TIMEOUT", "1500ms")
    assert (OperatorSettings().max_connections, OperatorSettings().header_timeout) == (8, 1.5)
    monkeypatch.setenv("CCRED_HEADER_TIMEOUT", "2.5")
    assert OperatorSettings().header_timeout == 2.5
    for name, value in (("CCRED_MAX_CONNECTIONS", "0"), ("CCRED_HEADER_TIMEOUT", "0"), ("CCRED_HEADER_TIMEOUT", "x")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            OperatorSettings()
        monkeypatch.delenv(name)


def test_the_refusal_is_a_whole_http_answer() -> None:
    raw = closing_error(403, "Forbidden", "PermissionDenied", "no")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "HTTP/1.1 403 Forbidden"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Length"] == str(len(body)) and headers["Connection"] == "close"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"error": {"reason": "PermissionDenied", "message": "no"}}


# --- through the server, in this process -------------------------------------------------------


class Engine:
    metrics = Metrics()

    def cached_body(self, namespace: str, name: str) -> bytes | None:
        return b'{"value": "v"}'

    def describe(self) -> list[dict[str, Any]]:
        return []


def _exchange(path: str, data: bytes | None) -> tuple[bytes, str | None]:
    """Connect, send ``data`` (None: nothing), read until the server closes: (bytes, OSError name)."""
    received, error = b"", None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        try:
            if data is not None:
                sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            error = type(exc).__name__
    return received, error


async def _serving(path: Path, **overrides: Any) -> CredentialServer:
    server = CredentialServer(OperatorSettings(socket_path=str(path), **overrides), Engine(), lambda: True)  # type: ignore[arg-type]
    await server.start()
    return server


async def test_a_refused_peer_reads_its_403_whatever_it_sends(tmp_path: Path) -> None:
    server = await _serving(tmp_path / "s.sock", allowed_uids=[os.getuid() + 1])
    try:
        for data in (None, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 600, b"GET /a"):
            received, error = await asyncio.to_thread(_exchange, str(tmp_path / "s.sock"), data)
            assert error is None and received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), (data, error)
        # More than 64 KiB is not read on: the connection is cut off.
        received, error = await asyncio.to_thread(_exchange, str(tmp_path / "s.sock"), b"x" * (1 << 20))
        assert error is not None or received.startswith(b"HTTP/1.1 403")
    finally:
        await server.close()


async def test_close_drops_lingering_refused_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = await _serving(tmp_path / "s.sock", allowed_uids=[os.getuid() + 1], header_timeout=60)
    reader, writer = await asyncio.open_unix_connection(path)
    assert (await reader.readline()).startswith(b"HTTP/1.1 403")
    started = time.monotonic()
    await asyncio.wait_for(server.close(), 10)
    assert time.monotonic() - started < 5  # not held open for the 60 s linger
    writer.close()


async def test_the_limit_is_lowered_to_fit_the_fd_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(server_module, "raise_fd_limit", lambda needed: asked.append(needed) or 1024)  # hard 1024
    server = await _serving(tmp_path / "s.sock", max_connections=5000)
    try:
        assert asked == [5000 + 512 + connections.FD_RESERVE]
        assert server._policy.table.limit == 1024 - 512 - connections.FD_RESERVE
        assert "leaves room for 384 socket connections, not CCRED_MAX_CONNECTIONS=5000" in caplog.text
    finally:
        await server.close()


def test_policy_allows_only_listed_uids() -> None:
    policy = ConnectionPolicy([0, 10001], 4, 1.0)
    assert policy.allows(connections.Peer(1, 10001, 0))
    assert not policy.allows(connections.Peer(1, 4242, 0)) and not policy.allows(None)
