"""The processes bench/socket_bench.py starts besides the operator, and its raw HTTP helpers.

* ``_bare SOCK SPEC LOOP``: a bare aiohttp server answering every request with one pre-built response;
* ``_client SOCK PATH CLIENTS WARMUP DURATION LOOP``: the load generator, N keep-alive HTTP/1.1
  connections with one request in flight on each, driven by a minimal ``asyncio.Protocol`` (no
  streams, no HTTP library) so that it costs little; prints a JSON summary.

LOOP is ``asyncio`` (the standard loop) or ``uvloop``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

#: Headers that legitimately differ between two servers or two responses (not part of the "same bytes").
VOLATILE = {"date", "server", "content-length", "connection", "keep-alive"}
LOOPS = ("asyncio", "uvloop")


def run_on(loop: str, main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the standard loop or on uvloop, the way ``connector-credentials run`` starts either."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    elif loop != "asyncio":
        raise ValueError(f"unknown loop {loop!r}")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# --- a raw HTTP/1.1 exchange over a Unix socket (set-up and verification only) ------------------


def request_bytes(path: str) -> bytes:
    """The request every client sends (what a controller's keep-alive client sends, give or take)."""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n".encode("ascii")


def fetch_once(sock_path: str, path: str, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """One GET on a fresh connection: (status, headers in order, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(request_bytes(path))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the response headers")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the end of the body")
            rest += chunk
        return status, headers, rest[:length]


def stable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in headers if k.lower() not in VOLATILE)


# --- the bare server (a separate process) --------------------------------------------------------


def bare_server_main(sock_path: str, spec_path: str, loop: str) -> None:
    """A minimal aiohttp server: one pre-built answer to every request, no checks at all, on ``loop``."""
    from aiohttp import web

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    body = base64.b64decode(spec["body"])
    headers = [(k, v) for k, v in spec["headers"]]
    status = int(spec["status"])

    async def handle(_request: web.BaseRequest) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    async def main() -> None:
        # aiohttp's low-level server (no Application, no router), as the operator uses: the cheapest
        # aiohttp server there is, with the same keep-alive and logging options.
        server = web.Server(handle, keepalive_timeout=30.0, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(sock_path)
        sock.listen(512)
        sock.setblocking(False)
        await web.SockSite(runner, sock, backlog=512).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    run_on(loop, main())


# --- the load generator (a separate process) -----------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request in flight; the next request leaves from data_received."""

    def __init__(self, request: bytes, run: _Run) -> None:
        self.request = request
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # total bytes of the current response once its head is parsed
        self.sent_at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's: no isinstance() check here.
        self.transport = cast(asyncio.Transport, transport)

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._finish(ConnectionError("response without Content-Length"))
                return
            eol = head.find(b"\r\n", at + 2)
            self.need = end + 4 + int(head[at + 17 : eol if eol >= 0 else len(head)])
        if len(buffer) < self.need:
            return
        now = time.perf_counter()
        ok = buffer[9:12] == b"200"
        del buffer[: self.need]
        self.need = -1
        run = self.run
        run.total += 1
        if not ok:
            run.errors += 1
        if run.start <= now <= run.end:
            run.latencies.append(now - self.sent_at)
        if buffer:
            self._finish(ConnectionError("unexpected bytes after a response"))
        elif now >= run.end:
            self._finish(None)
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class _Run:
    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.latencies: list[float] = []
        self.errors = 0
        self.total = 0  # every response, warm-up included


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _load(sock_path: str, path: str, clients: int, warmup: float, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run()
    request = request_bytes(path)
    conns: list[_Connection] = []
    try:
        for _ in range(clients):
            _transport, conn = await loop.create_unix_connection(lambda: _Connection(request, run), sock_path)
            conns.append(conn)
        run.start = time.perf_counter() + warmup
        run.end = run.start + duration
        for conn in conns:
            conn.send()
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), timeout=warmup + duration + 30)
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    latencies = sorted(run.latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": run.errors,
        "total": run.total,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def client_main(sock_path: str, path: str, clients: int, warmup: float, duration: float, loop: str) -> None:
    gc.disable()  # only floats are allocated during the run; no cycles to collect
    print(json.dumps(run_on(loop, _load(sock_path, path, clients, warmup, duration))), flush=True)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "_bare":
        bare_server_main(*sys.argv[2:5])
        return 0
    if len(sys.argv) == 8 and sys.argv[1] == "_client":
        sock_path, path, clients, warmup, duration, loop = sys.argv[2:8]
        client_main(sock_path, path, int(clients), float(warmup), float(duration), loop)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
