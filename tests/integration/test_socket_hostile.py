"""Hostile and malformed input on the credential socket (issues 5 and 6), against one running operator.

Every hostile request must end in a 4xx answer or a closed connection, never a value; slow and
idle connections must not stop ``/healthz`` from answering at once, and memory must stay bounded.
A uid that is not allowed is answered 403 when it connects, before a byte of it is read; the
connection limit closes the connection idle longest to make room; a request head must arrive
within ``CCRED_HEADER_TIMEOUT``; no client-supplied text reaches the log. Tests that need other
settings start their own operator in the module's namespace, on a socket of their own.
The figures (connections held, /healthz latency, RSS) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector_credentials.client import CredentialClient, ServerUnreachable
from tests.integration.conftest import World
from tests.support.awsemu import AwsEmulator
from tests.support.awsproxy import FaultProxy
from tests.support.kube import Cluster
from tests.support.kubeproxy import KubeFaultProxy
from tests.support.rawhttp import NOBODY, Reply, assert_error, exchange, parse_reply, request
from tests.support.runner import OperatorProcess, wait_until


class Hostile:
    """One operator shared by this module's tests (starting one per test would dominate the run)."""

    def __init__(self, world: World, process: OperatorProcess) -> None:
        self.world, self.process = world, process
        self.path = world.socket_path
        self.ns = world.namespace
        self.value = world.canaries[0]
        self.target = f"/v1/credentials/{self.ns}/plain"

    def assert_refused(self, label: str, reply: Reply) -> None:
        """A 4xx answer or a closed connection; never the value."""
        assert reply.status is None or 400 <= reply.status < 500, (label, reply, reply.raw[:200])
        assert not self.leaks(reply), label
        if reply.status is not None:
            # Even the HTTP parser's own refusals keep the API's shape and say no-store.
            headers = {k.lower(): v for k, v in reply.headers.items()}
            assert headers.get("cache-control") == "no-store", (label, reply.raw[:200])
            assert reply.json()["error"]["reason"], label

    def leaks(self, reply: Reply) -> bool:
        return self.value.encode() in reply.raw

    def assert_serving(self) -> None:
        assert self.process.running
        assert request(self.path, "/healthz").status == 200
        assert request(self.path, self.target).json()["value"] == self.value

    def start_operator(self, name: str, env: dict[str, str]) -> tuple[OperatorProcess, str]:
        """Another operator with other settings, on its own socket, serving the credential from memory."""
        path = str(self.world.workdir / f"{name}.sock")
        process = self.world.start_operator(socket_path=path, extra_env=env)
        wait_until(lambda: request(path, self.target).status == 200, timeout=20, message=f"{name}: first read")
        return process, path


@pytest.fixture(scope="module")
def hostile(cluster: Cluster, kube: KubeFaultProxy, aws: AwsEmulator, proxy: FaultProxy) -> Iterator[Hostile]:
    workdir = Path(tempfile.mkdtemp(prefix="ccred-", dir="/tmp"))
    world = World(cluster, kube, aws, proxy, workdir)
    try:
        world.apply("plain", {"secretArn": world.secret("plain")})
        process = world.start_operator()
        world.wait_reason("plain", "AccessVerified")
        yield Hostile(world, process)
        assert process.running, "the operator died under hostile input"
        process.stop()
        world.assert_no_leaks()
    finally:
        for operator in world.operators:
            if operator.running:
                operator.stop()
        proxy.clear()
        shutil.rmtree(workdir, ignore_errors=True)


def _http(line: str, *headers: str) -> bytes:
    return ("\r\n".join([line, "Host: localhost", "Connection: close", *headers]) + "\r\n\r\n").encode()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_malformed_and_hostile_requests_are_refused(hostile: Hostile) -> None:
    ns, path = hostile.ns, hostile.path
    cred = f"/v1/credentials/{ns}"
    long_query = "?" + "&".join(f"k{i}=v" for i in range(800))
    cases: dict[str, bytes] = {
        # garbage and non-HTTP
        "zero bytes": b"\x00" * 512,
        "random bytes": bytes(range(256)) * 8,
        "tls client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)),
        "ssh banner": b"SSH-2.0-OpenSSH_9.6\r\n",
        "json": b'{"get": "/healthz"}\r\n\r\n',
        "smtp": b"HELO example.com\r\n\r\n",
        "bare LF request": f"GET {cred}/plain HTTP/1.1\nHost: x\n\n".encode() + b"\x00",
        "unknown version": _http("GET /healthz HTTP/1.2"),
        "version 9.9": _http(f"GET {cred}/plain HTTP/9.9"),
        "no version, junk after": f"GET {cred}/plain FOO/1.1\r\n\r\n".encode(),
        "missing Host": f"GET {cred}/plain HTTP/1.1\r\n\r\n".encode(),
        # sizes
        "request line > 8 KiB": _http(f"GET {cred}/{'a' * 9000} HTTP/1.1"),
        "header > 8 KiB": _http("GET /healthz HTTP/1.1", "X-Big: " + "b" * 9000),
        "200 headers": _http("GET /healthz HTTP/1.1", *(f"X-H{i}: v" for i in range(200))),
        "huge header name": _http("GET /healthz HTTP/1.1", "X" * 5000 + ": v"),
        "long query": _http(f"GET {cred}/plain{long_query} HTTP/1.1"),
        "CL and TE": _http(f"GET {cred}/plain HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked"),
        "bad chunked body": _http("POST /healthz HTTP/1.1", "Transfer-Encoding: chunked") + b"zz\r\nhello\r\n",
        "huge Content-Length": _http("PUT /healthz HTTP/1.1", "Content-Length: 100000000000") + b"abc",
        "negative Content-Length": _http("GET /healthz HTTP/1.1", "Content-Length: -1"),
        # traversal and odd paths
        "dot-dot": _http("GET /v1/credentials/../../etc/passwd HTTP/1.1"),
        "dot-dot in namespace slot": _http(f"GET {cred}/../../../etc/passwd HTTP/1.1"),
        "encoded dot-dot": _http("GET /v1/credentials/%2e%2e%2f%2e%2e%2fetc/passwd HTTP/1.1"),
        "encoded slash in name": _http(f"GET {cred}/%2e%2e%2fplain HTTP/1.1"),
        "double-encoded": _http(f"GET {cred}/%252e%252e%252fplain HTTP/1.1"),
        "backslashes": _http(f"GET {cred}/..\\..\\plain HTTP/1.1"),
        "leading //": _http(f"GET /{cred}/plain HTTP/1.1"),
        "inner //": _http(f"GET {cred}//plain HTTP/1.1"),
        "empty name": _http(f"GET {cred}/ HTTP/1.1"),
        "raw UTF-8 name": _http(f"GET {cred}/pl\u00e4in HTTP/1.1"),
        "encoded UTF-8 name": _http(f"GET {cred}/pl%C3%A4in HTTP/1.1"),
        "homoglyph name": _http(f"GET {cred}/pl%D0%B0in HTTP/1.1"),  # Cyrillic a
        "overlong UTF-8": _http(f"GET {cred}/%C0%AEplain HTTP/1.1"),
        "raw NUL": f"GET {cred}/plain\x00 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "encoded NUL": _http(f"GET {cred}/plain%00 HTTP/1.1"),
        "encoded NUL in namespace": _http(f"GET /v1/credentials/{ns}%00/plain HTTP/1.1"),
        "name of 254": _http(f"GET {cred}/{'a' * 254} HTTP/1.1"),
        "namespace of 64": _http(f"GET /v1/credentials/{'n' * 64}/plain HTTP/1.1"),
        "asterisk form": _http("GET * HTTP/1.1"),
        "no leading slash": _http("GET healthz HTTP/1.1"),
        "header injection": _http("GET /healthz HTTP/1.1", "X-A: a\rX-B: b"),
        "NUL in header": _http("GET /healthz HTTP/1.1", "X-A: a\x00b"),
        "obs-fold header": _http("GET /healthz HTTP/1.1", "X-A: a", " folded"),
        # query junk on the one parameter there is
        "refresh=yes": _http(f"GET {cred}/plain?refresh=yes HTTP/1.1"),
        "refresh=NUL": _http(f"GET {cred}/plain?refresh=%00 HTTP/1.1"),
        "refresh=true+NUL": _http(f"GET {cred}/plain?refresh=true%00 HTTP/1.1"),
        "refresh=2": _http(f"GET {cred}/plain?refresh=2 HTTP/1.1"),
        "refresh=utf-8": _http(f"GET {cred}/plain?refresh=tr%C3%BCe HTTP/1.1"),
        "refresh=huge": _http(f"GET {cred}/plain?refresh={'t' * 3000} HTTP/1.1"),
    }
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "BREW"):
        cases[method] = _http(f"{method} {cred}/plain HTTP/1.1", "Content-Length: 0")
    cases["CONNECT"] = _http("CONNECT localhost:443 HTTP/1.1")
    cases["OPTIONS *"] = _http("OPTIONS * HTTP/1.1")
    cases["POST with body"] = _http(f"POST {cred}/plain HTTP/1.1", "Content-Length: 4000") + b"x" * 4000

    summary: dict[int | None, list[str]] = {}
    for label, data in cases.items():
        reply = exchange(path, data, timeout=5)
        hostile.assert_refused(label, reply)
        summary.setdefault(reply.status, []).append(label)
    # Names that are valid but undeclared are 404, not served, not 400: the boundary is exact.
    assert request(path, f"{cred}/{'a' * 253}").status == 404
    assert request(path, f"/v1/credentials/{'n' * 63}/plain").status == 404
    # Percent-encoding of plain characters and unknown query keys are harmless: same credential.
    assert request(path, f"{cred}/pl%61in").json()["value"] == hostile.value
    assert request(path, f"{cred}/plain?refresh=false&x=%zz&refresh=true").json()["value"] == hostile.value
    for dotted in (f"{cred}/x/../plain", f"{cred}/./plain", f"{cred}/x/../../other/plain"):
        hostile.assert_refused(dotted, request(path, dotted))
    print("\nhostile requests by answer:")
    for status, labels in sorted(summary.items(), key=lambda item: item[0] or 0):
        print(f"  {status or 'closed'}: {len(labels)}: {', '.join(labels)}")
    hostile.assert_serving()


#: A kept-alive /healthz request (no "Connection: close").
_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _ensure_fds(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); skip where the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _connect(path: str, data: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)  # blocking (no timeout yet): waits for room in the listen backlog
        sock.settimeout(10)
        if data:
            sock.sendall(data)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_reply(sock: socket.socket) -> Reply:
    """One answer on a kept-alive connection (head and Content-Length body), or what came before a close."""
    received = b""
    while True:
        head, sep, rest = received.partition(b"\r\n\r\n")
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        if sep and match and len(rest) >= int(match.group(1)):
            return parse_reply(received)
        chunk = sock.recv(65536)
        if not chunk:
            return parse_reply(received)
        received += chunk


def _closed_silently(sock: socket.socket) -> bool:
    """The server closed the connection without sending a byte."""
    return not _still_open(sock) and _read_all(sock) == b""


def _drip(sock: socket.socket, data: bytes, interval: float, replies: list[Reply], lock: threading.Lock) -> None:
    for byte in data:
        sock.sendall(bytes([byte]))
        time.sleep(interval)
    reply = _read_reply(sock)
    with lock:
        replies.append(reply)


def _probe(path: str, target: str, latencies: list[float]) -> Reply:
    started = time.monotonic()
    reply = request(path, target, timeout=5)
    latencies.append(time.monotonic() - started)
    return reply


def _open_a_thousand(hostile: Hostile, path: str, stack: contextlib.ExitStack) -> dict[str, list[socket.socket]]:
    """1,000 connections, in turn idle, with half a request line, and with headers but no blank line."""
    half_line = f"GET /v1/credentials/{hostile.ns}/pl".encode()
    no_blank_line = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    sent = {"idle": b"", "half request line": half_line, "headers, no blank line": no_blank_line}
    groups: dict[str, list[socket.socket]] = {group: [] for group in sent}
    for index in range(1000):
        group = list(groups)[index % 3]
        groups[group].append(stack.enter_context(_connect(path, sent[group])))
    return groups


def _measure_beside(hostile: Hostile, path: str, stack: contextlib.ExitStack) -> tuple[list[float], list[Reply]]:
    """/healthz and a cached read for 2 s, beside 5 slow clients (a byte every 30 ms)."""
    slow: list[Reply] = []
    lock = threading.Lock()
    drippers = [
        threading.Thread(target=_drip, args=(stack.enter_context(_connect(path)), _HEALTHZ, 0.03, slow, lock))
        for _ in range(5)
    ]
    for thread in drippers:
        thread.start()
    latencies: list[float] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert _probe(path, "/healthz", latencies).status == 200
        assert _probe(path, hostile.target, latencies).json()["value"] == hostile.value
        time.sleep(0.05)
    for thread in drippers:
        thread.join(15)
    return latencies, slow


def test_a_thousand_idle_connections_at_the_default_limit(hostile: Hostile) -> None:
    """At CCRED_MAX_CONNECTIONS (256) the oldest idle connections make room; the rest time out (5 s)."""
    _ensure_fds(4096)
    path, pid = hostile.path, hostile.process.pid
    assert pid is not None
    for _ in range(50):  # warm up, so the figures measure connections, not first-use allocations
        request(path, "/healthz")
    rss_before, fds_before = _rss_kib(pid), _open_fds(pid)
    since = len(hostile.process.output)
    with contextlib.ExitStack() as stack:
        groups = _open_a_thousand(hostile, path, stack)
        in_order = [groups[list(groups)[index % 3]][index // 3] for index in range(1000)]

        def within_the_limit() -> list[int] | None:  # those closed to make room are closed a moment later
            still = [index for index, sock in enumerate(in_order) if _still_open(sock)]
            return still if len(still) <= 256 else None

        held = wait_until(within_the_limit, timeout=10, message="more connections held than the limit")
        latencies, slow = _measure_beside(hostile, path, stack)
        fds_during, rss_during = _open_fds(pid), _rss_kib(pid)
        # The header timeout (5 s by default) closes every one the limit left open, without a word.
        wait_until(lambda: all(_closed_silently(sock) for sock in in_order), timeout=30, message="all closed")
    wait_until(lambda: _open_fds(pid) <= fds_before + 5, timeout=10, message="connections were not released")
    rss_after = _rss_kib(pid)
    worst, median = max(latencies), statistics.median(latencies)
    print(
        f"\n1,000 idle/half-sent connections + 5 slow clients at the default limit: {len(held)} held "
        f"(oldest held: #{held[0] if held else None}); operator fds {fds_before} -> {fds_during}"
        f"\n/healthz and a cached read beside them: {len(latencies)} requests, median {median * 1000:.1f} ms, "
        f"worst {worst * 1000:.1f} ms\nRSS: before {rss_before} KiB, during {rss_during} KiB, after {rss_after} KiB"
    )
    assert worst < 1.0
    assert len(slow) == 5 and all(reply.status == 200 for reply in slow), slow
    assert 200 <= len(held) <= 256 and held[0] >= 1000 - 256, held[:5]  # the newest are the ones kept
    assert fds_during <= fds_before + 256 + 20
    assert rss_during - rss_before < 64 * 1024 and rss_after - rss_before < 64 * 1024
    hostile.process.wait_for_log("idle to make room for new ones (CCRED_MAX_CONNECTIONS=256)", since=since)
    hostile.process.wait_for_log("without a complete request head within 5s", timeout=15, since=since)
    hostile.assert_serving()


def test_a_thousand_idle_connections_under_a_raised_limit(hostile: Hostile) -> None:
    """All 1,000 held at once (CCRED_MAX_CONNECTIONS=1100): /healthz still answers at once; each is still served."""
    _ensure_fds(4096)
    process, path = hostile.start_operator("wide", {"CCRED_MAX_CONNECTIONS": "1100", "CCRED_HEADER_TIMEOUT": "120"})
    pid = process.pid
    assert pid is not None
    fds_before = _open_fds(pid)
    with contextlib.ExitStack() as stack:
        groups = _open_a_thousand(hostile, path, stack)
        # When the connects return, the last few hundred may still wait in the listen backlog, and a probe
        # (a connect with a timeout) would find it full and fail at once: measure beside them once accepted
        # (give or take a few of the operator's own descriptors opened or closed meanwhile).
        wait_until(lambda: _open_fds(pid) >= fds_before + 990, timeout=10, message="the 1,000 were not accepted")
        latencies, slow = _measure_beside(hostile, path, stack)
        fds_during = _open_fds(pid)
        held = sum(1 for sockets in groups.values() for sock in sockets if _still_open(sock))
        for sock in groups["idle"]:
            sock.sendall(b"\x16\x03\x01\x00\x10" + bytes(16))
        for sock in groups["half request line"]:
            sock.sendall(b"ain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        for sock in groups["headers, no blank line"]:
            sock.sendall(b"\r\n")
        finished: dict[str, list[int | None]] = {}
        for group, sockets in groups.items():
            for sock in sockets:
                reply = parse_reply(_read_all(sock))
                if group == "idle":
                    hostile.assert_refused(group, reply)
                finished.setdefault(group, []).append(reply.status)
    worst, median = max(latencies), statistics.median(latencies)
    print(
        f"\n1,000 idle/half-sent connections held (limit 1100): operator fds {fds_before} -> {fds_during}; "
        f"/healthz and a cached read: {len(latencies)} requests, median {median * 1000:.1f} ms, "
        f"worst {worst * 1000:.1f} ms"
    )
    assert held == 1000 and fds_during >= fds_before + 1000
    assert worst < 1.0
    assert len(slow) == 5 and all(reply.status == 200 for reply in slow), slow
    assert set(finished["idle"]) <= {400, None}
    assert finished["half request line"] == [200] * 333  # the credential answers for the full path
    assert finished["headers, no blank line"] == [200] * 333
    assert "Closed socket connections" not in process.output
    assert process.stop() == 0


def test_connection_limit_closes_the_connection_idle_longest(hostile: Hostile) -> None:
    limit = 8
    process, path = hostile.start_operator("limit", {"CCRED_MAX_CONNECTIONS": str(limit), "CCRED_HEADER_TIMEOUT": "60"})
    world = hostile.world
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(_connect(path)) for _ in range(limit - 1)]
        kept = stack.enter_context(_connect(path, _HEALTHZ))  # answered: idle since its answer
        assert _read_reply(kept).status == 200
        idle.append(stack.enter_context(_connect(path)))  # the 9th: the first is closed to make room
        wait_until(lambda: _closed_silently(idle[0]), timeout=5, message="the oldest idle connection was kept")
        assert all(_still_open(sock) for sock in [*idle[1:], kept])
        kept.sendall(_HEALTHZ)  # used again: now the one idle the shortest
        assert _read_reply(kept).status == 200
        for turn in range(1, limit):
            idle.append(stack.enter_context(_connect(path)))
            wait_until(lambda turn=turn: _closed_silently(idle[turn]), timeout=5, message=f"#{turn} not closed")
            assert _still_open(kept), f"the recently used connection was closed before #{turn}"
        idle.append(stack.enter_context(_connect(path)))
        wait_until(lambda: _closed_silently(kept), timeout=5, message="the kept-alive connection, now oldest")
        assert all(_still_open(sock) for sock in idle[limit:])
        assert request(path, "/healthz").status == 200  # at the limit: a new connection still gets in

        # Every connection busy (a read waiting on AWS): a new one is closed at once, unanswered.
        world.proxy.latency(4.0, "GetSecretValue", secret_id_contains=f"{world.prefix}/plain")
        try:
            busy = []
            slow_read = _HEALTHZ + _http(f"GET {hostile.target}?refresh=true HTTP/1.1")
            for _ in range(limit):
                sock = stack.enter_context(_connect(path, slow_read))
                assert _read_reply(sock).status == 200  # /healthz answered: the read behind it is parsed
                busy.append(sock)
            assert all(_closed_silently(sock) for sock in idle)
            started = time.monotonic()
            turned_away = exchange(path, _http("GET /healthz HTTP/1.1"), timeout=5)
            closed_in = time.monotonic() - started
            assert all(_still_open(sock) for sock in busy), "a busy connection was answered or closed meanwhile"
            assert turned_away.status is None, turned_away
            for sock in busy:
                assert _read_reply(sock).json()["value"] == hostile.value
        finally:
            world.proxy.clear()
    wait_until(lambda: request(path, "/healthz").status == 200, timeout=10, message="healthz once answered")
    assert process.stop() == 0
    # Counted, not logged one by one: the first at once, the rest summed every 10 s (and at exit).
    lines = [line for line in process.output.splitlines() if "Closed socket connections" in line]
    evicted = sum(int(n) for line in lines for n in re.findall(r"(\d+) idle to make room", line))
    refused = sum(int(n) for line in lines for n in re.findall(r"(\d+) new at once", line))
    print(
        f"\nlimit {limit}: {evicted} idle closed, {refused} new closed at once, {len(lines)} log lines; "
        f"the one turned away was closed in {closed_in * 1000:.1f} ms"
    )
    assert evicted == 2 * limit + 1 and refused == 1
    assert 2 <= len(lines) <= 4


def test_a_request_head_must_arrive_within_the_header_timeout(hostile: Hostile) -> None:
    process, path = hostile.start_operator("head", {"CCRED_HEADER_TIMEOUT": "1"})
    with contextlib.ExitStack() as stack:
        kept = stack.enter_context(_connect(path, _HEALTHZ))
        assert _read_reply(kept).status == 200
        started = time.monotonic()
        silent = stack.enter_context(_connect(path))
        dripping = stack.enter_context(_connect(path, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Drip: "))
        cut_off: list[float] = []

        def drip() -> None:  # a header that never ends, a byte every 100 ms: bytes do not extend the deadline
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 15:
                    dripping.sendall(b"a")
                    time.sleep(0.1)
            cut_off.append(time.monotonic() - started)

        dripper = threading.Thread(target=drip)
        dripper.start()
        wait_until(lambda: _closed_silently(silent), timeout=10, message="a silent connection outlived the timeout")
        silent_closed = time.monotonic() - started
        dripper.join(20)
        # The kept-alive connection has been idle longer than the header timeout: the keep-alive timeout applies.
        assert _still_open(kept)
        kept.sendall(_HEALTHZ)
        assert _read_reply(kept).status == 200
        kept.sendall(b"GET /heal")  # the next request's head is timed from its first byte
        next_started = time.monotonic()
        wait_until(lambda: _closed_silently(kept), timeout=10, message="a half-sent second request stayed open")
        kept_closed = time.monotonic() - next_started
        slow: list[Reply] = []
        _drip(stack.enter_context(_connect(path)), _HEALTHZ, 0.01, slow, threading.Lock())
    print(
        f"\nheader timeout 1 s: silent closed after {silent_closed:.2f} s, dripping after {cut_off[0]:.2f} s, "
        f"a kept-alive connection's half-sent next request after {kept_closed:.2f} s"
    )
    assert 0.95 <= silent_closed < 6 and 0.95 <= cut_off[0] < 6 and 0.95 <= kept_closed < 6
    assert slow[0].status == 200  # a head sent slowly but in time is served
    assert process.stop() == 0
    timed_out = re.findall(r"(\d+) without a complete request head within 1s \(CCRED_HEADER_TIMEOUT\)", process.output)
    assert sum(map(int, timed_out)) == 3, timed_out


# A process of another uid: connect, send each payload (or nothing) and read until the server closes.
_RAW_AS_UID = r"""
import json, os, socket, sys
path, uid, payloads = sys.argv[1], int(sys.argv[2]), json.load(sys.stdin)
os.setgroups([0]); os.setgid(0); os.setuid(uid)
answers = []
for payload in payloads:
    data, error = b"", None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            if payload is not None:
                sock.sendall(bytes.fromhex(payload))
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            error = type(exc).__name__
    answers.append({"data": data.hex(), "error": error})
print(json.dumps({"pid": os.getpid(), "answers": answers}))
"""


def raw_as_uid(path: str, uid: int, *payloads: bytes | None) -> tuple[int, list[tuple[Reply, str | None]]]:
    """Each payload on a connection of its own, from a process of ``uid``: its pid, and (reply, OSError name)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _RAW_AS_UID, path, str(uid)],
        input=json.dumps([None if payload is None else payload.hex() for payload in payloads]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    return result["pid"], [(parse_reply(bytes.fromhex(a["data"])), a["error"]) for a in result["answers"]]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid needs root")


@needs_root
def test_a_disallowed_uid_is_refused_when_it_connects(hostile: Hostile) -> None:
    os.chmod(hostile.world.workdir, 0o755)  # other uids must traverse to the socket
    before = len(hostile.process.output)
    pid, answers = raw_as_uid(
        hostile.path,
        NOBODY,
        None,  # sends nothing: answered all the same, so nothing it sends is read first
        _http(f"GET {hostile.target} HTTP/1.1"),
        b"\x00" * 512,  # would be a 400 from the parser: it is never parsed
        _http("BREW /healthz HTTP/1.1"),
    )
    for reply, error in answers:
        assert error is None, error  # the 403, then the end of the stream: no reset, no broken pipe
        assert_error(reply, 403, "PermissionDenied")
        assert reply.headers["connection"] == "close"
        assert not hostile.leaks(reply)
    line = hostile.process.wait_for_log(f"Refused a connection from pid {pid} uid {NOBODY}", since=before)
    assert "CCRED_ALLOWED_UIDS" in line
    assert hostile.process.output[before:].count("Refused a connection") == 1  # one line per uid per 10 s
    # A refused peer that will not stop sending is cut off (its bytes are dropped, never buffered).
    _pid, [(flood, _error)] = raw_as_uid(hostile.path, NOBODY, b"x" * (1 << 20))
    assert flood.status in (None, 403)
    hostile.assert_serving()


@needs_root
def test_client_text_cannot_forge_log_lines(hostile: Hostile) -> None:
    os.chmod(hostile.world.workdir, 0o755)
    marker = f"FORGED-{uuid.uuid4().hex}"
    forged = f"2026-01-01 00:00:00,000 [WARNING  ] {marker}"
    encoded = forged.replace(" ", "%20")
    cred = f"/v1/credentials/{hostile.ns}"
    hostile_requests = [
        _http(f"GET {cred}/plain%0A{encoded} HTTP/1.1"),
        _http(f"GET {cred}/x%0D%0A{encoded} HTTP/1.1"),
        _http(f"GET /nope%0A{encoded} HTTP/1.1"),
        _http(f"GET {cred}/plain?refresh=%0A{encoded} HTTP/1.1"),
        _http(f"{marker} {cred}/plain HTTP/1.1"),
        _http("GET /healthz HTTP/1.1", f"X-Forged: x\n{forged}"),
        f"GET /\n{forged} HTTP/1.1\r\n\r\n".encode(),
        _http(f"POST {cred}/plain HTTP/1.1", f"Content-Length: {len(forged)}") + forged.encode(),
    ]
    before = len(hostile.process.output)
    _pid, refused = raw_as_uid(hostile.path, 4243, *hostile_requests)
    for data in hostile_requests:  # and from an allowed uid, through every error path there is
        hostile.assert_refused(data.decode("latin-1")[:40], exchange(hostile.path, data, timeout=5))
    hostile.process.wait_for_log("uid 4243", since=before)
    hostile.assert_serving()
    written = hostile.process.output[before:]
    assert marker not in written, [line for line in written.splitlines() if marker in line]
    assert [reply.status for reply, _error in refused] == [403] * len(hostile_requests)


def test_request_without_http1_version_is_refused(hostile: Hostile) -> None:
    answers = {
        "HTTP/0.9 style": exchange(hostile.path, f"GET {hostile.target}\r\n\r\n".encode(), timeout=5),
        "HTTP/2.0": exchange(hostile.path, _http(f"GET {hostile.target} HTTP/2.0"), timeout=5),
    }
    print("\n" + ", ".join(f"{label}: {reply.status} {reply.version}" for label, reply in answers.items()))
    for label, reply in answers.items():
        assert reply.status is None or 400 <= reply.status < 600, (label, reply)
        assert not hostile.leaks(reply), label


def test_unroutable_targets_get_the_error_shape_and_no_store(hostile: Hostile) -> None:
    for data in (
        _http("OPTIONS * HTTP/1.1"),
        _http("CONNECT localhost:443 HTTP/1.1"),
        _http(f"GET {hostile.target}%0A HTTP/1.1"),
    ):
        reply = exchange(hostile.path, data, timeout=5)
        assert reply.status is not None and 400 <= reply.status < 500, reply
        assert reply.headers.get("cache-control") == "no-store", (data[:30], reply.headers)
        assert set(reply.json()["error"]) == {"reason", "message"}


def test_listing_with_trailing_slash(hostile: Hostile) -> None:
    listed = request(hostile.path, "/v1/credentials/")
    assert listed.status == 200, listed
    assert [row["name"] for row in listed.json()["credentials"]] == ["plain"]


def test_malformed_requests_cannot_flood_the_log(hostile: Hostile) -> None:
    before = len(hostile.process.output.splitlines())
    for _ in range(50):
        reply = exchange(hostile.path, _http(f"GET /{'a' * 5000} HTTP/1.1"), timeout=5)
        assert reply.status == 400
    hostile.assert_serving()
    time.sleep(0.3)
    added = len(hostile.process.output.splitlines()) - before
    print(f"\n50 oversized request lines added {added} lines to the operator log")
    assert added <= 10


def fill_backlog(stack: contextlib.ExitStack, pid: int, path: str, *, limit: int) -> int:
    """Stop the operator (resumed when ``stack`` closes) and queue connects until the backlog is full."""
    os.kill(pid, signal.SIGSTOP)  # nothing accepts: every connect waits in the backlog
    stack.callback(os.kill, pid, signal.SIGCONT)
    pending = 0
    for _ in range(limit):
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            break
        pending += 1
    return pending


def test_listen_backlog_is_the_configured_512(hostile: Hostile) -> None:
    pid = hostile.process.pid
    assert pid is not None
    with contextlib.ExitStack() as stack:
        pending = fill_backlog(stack, pid, hostile.path, limit=600)
    print(f"\nconnections queued while the operator was stopped: {pending}")
    wait_until(lambda: _healthz(hostile.path), timeout=10, message="healthz after SIGCONT")
    hostile.assert_serving()
    assert pending >= 512


def test_client_waits_for_room_in_a_full_backlog(hostile: Hostile) -> None:
    pid = hostile.process.pid
    assert pid is not None
    with contextlib.ExitStack() as stack:
        fill_backlog(stack, pid, hostile.path, limit=1000)
        resume = threading.Timer(0.5, os.kill, (pid, signal.SIGCONT))
        resume.start()
        stack.callback(resume.join)
        started = time.monotonic()
        try:
            with CredentialClient(hostile.path, timeout=5) as client:
                got = client.get(hostile.ns, "plain").value == hostile.value
        except ServerUnreachable as exc:
            print(f"\nclient gave up after {time.monotonic() - started:.3f}s: {exc.message[:120]}")
            raise
    wait_until(lambda: _healthz(hostile.path), timeout=10, message="healthz after SIGCONT")
    assert got


def _healthz(path: str) -> bool:
    """/healthz answers 200; False while the backlog is still full (a connect with a timeout then fails at once)."""
    try:
        return request(path, "/healthz", timeout=5).status == 200
    except BlockingIOError:
        return False


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _still_open(sock: socket.socket) -> bool:
    """Connected, nothing to read, not closed by the server."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # an answer or EOF: the server is done with it
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(10)
