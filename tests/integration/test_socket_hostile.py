"""Hostile and malformed input on the credential socket (issue 5), against one running operator.

Every hostile request must end in a 4xx answer or a closed connection, never a value; slow and
idle connections must not stop ``/healthz`` from answering at once, and memory must stay bounded.
The figures (connections held, /healthz latency, RSS) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector_credentials.client import CredentialClient, ServerUnreachable
from tests.integration.conftest import World
from tests.integration.test_socket import Reply, exchange, parse_reply, request
from tests.support.awsemu import AwsEmulator
from tests.support.awsproxy import FaultProxy
from tests.support.kube import Cluster
from tests.support.kubeproxy import KubeFaultProxy
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


def test_slow_and_idle_connections_do_not_block_healthz(hostile: Hostile) -> None:
    path, pid = hostile.path, hostile.process.pid
    assert pid is not None
    for _ in range(50):  # warm up, so the figures measure connections, not first-use allocations
        request(path, "/healthz")
    rss_before = _rss_kib(pid)
    fds_before = _open_fds(pid)
    slow_replies: list[Reply] = []
    slow_lock = threading.Lock()
    slow_request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def drip() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            for byte in slow_request:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
            received = b""
            while not received.endswith(b'{"status": "ok"}'):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        with slow_lock:
            slow_replies.append(parse_reply(received))

    half_line = f"GET /v1/credentials/{hostile.ns}/pl".encode()
    no_blank_line = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    groups: dict[str, list[socket.socket]] = {"idle": [], "half request line": [], "headers, no blank line": []}
    latencies: list[float] = []
    with contextlib.ExitStack() as stack:
        for index in range(300):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(path)  # blocking: waits for room in the listen backlog
            sock.settimeout(10)
            group = list(groups)[index % 3]
            if group == "half request line":
                sock.sendall(half_line)
            elif group == "headers, no blank line":
                sock.sendall(no_blank_line)
            groups[group].append(sock)
        drippers = [threading.Thread(target=drip, name=f"drip-{i}") for i in range(5)]
        for thread in drippers:
            thread.start()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = request(path, "/healthz", timeout=5)
            latencies.append(time.monotonic() - started)
            assert reply.status == 200
            time.sleep(0.1)
        fds_during = _open_fds(pid)
        rss_during = _rss_kib(pid)
        held = sum(1 for sockets in groups.values() for sock in sockets if _still_open(sock))
        for thread in drippers:
            thread.join(15)
        # Every held connection is still served: finish each request (or send junk) and read the answer.
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
    assert len(slow_replies) == 5 and all(reply.status == 200 for reply in slow_replies), slow_replies
    assert set(finished["idle"]) <= {400, None}
    assert finished["half request line"] == [200] * 100  # the credential answers for the full path
    assert finished["headers, no blank line"] == [200] * 100
    time.sleep(0.5)
    for _ in range(50):
        request(path, "/healthz")
    rss_after = _rss_kib(pid)
    fds_after = _open_fds(pid)
    worst, median = max(latencies), statistics.median(latencies)
    print(
        f"\nheld open: {held} of 300 idle/partial connections + 5 slow (1 byte/100 ms) clients; "
        f"operator fds {fds_before} -> {fds_during} -> {fds_after}"
        f"\n/healthz beside them: {len(latencies)} requests, median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms"
        f"\nRSS: before {rss_before} KiB, during {rss_during} KiB, after {rss_after} KiB "
        f"(delta {rss_after - rss_before:+d} KiB)"
    )
    assert held == 300
    assert fds_during >= fds_before + 300
    assert worst < 1.0
    assert fds_after <= fds_before + 5, "connections were not released"
    assert rss_during - rss_before < 64 * 1024 and rss_after - rss_before < 64 * 1024
    hostile.assert_serving()


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
    wait_until(lambda: request(hostile.path, "/healthz").status == 200, timeout=5, message="healthz after SIGCONT")
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
    wait_until(lambda: request(hostile.path, "/healthz").status == 200, timeout=5, message="healthz after SIGCONT")
    assert got


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
