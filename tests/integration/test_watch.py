"""Watch streams (``?watch=true``) through the real operator: what a stream says and when (the
answer, rotations, an AWS outage, a deletion, heartbeats), the connection limit, a client that does
not read, the shutdown, the clients' ``watch`` across a restart, and ``get --watch``.

Streams are read raw off the socket (tests/support/watchstream.py: every line with the moment it
arrived, and how the stream ended) or through the client (tests/support/watching.py). The figures
(how long a change takes to reach a stream) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector_credentials.client import Credential, CredentialNotFound, ServerUnreachable
from tests.integration.conftest import World
from tests.support.rawhttp import exchange, request
from tests.support.runner import console_script, hermetic_env, wait_until
from tests.support.watching import Watcher
from tests.support.watchstream import CLEAN, WatchStream

HEARTBEAT = 1.0
#: Quick heartbeats, reads and retries: the figures of a stream come within seconds.
QUICK = {
    "CCRED_WATCH_HEARTBEAT": f"{HEARTBEAT:g}s",
    "CCRED_MIN_REFRESH_GAP": "0",
    "CCRED_BACKOFF_BASE": "0.2",
    "CCRED_BACKOFF_CAP": "1",
}


def _watch(world: World, name: str, **kwargs: Any) -> WatchStream:
    return WatchStream(world.socket_path, f"/v1/credentials/{world.namespace}/{name}?watch=true", **kwargs)


def _said(document: dict[str, Any]) -> tuple[int, str | None]:
    return document["status"], (document.get("error") or {}).get("reason")


def test_a_stream_says_the_answer_then_each_change_and_beats_when_quiet(world: World) -> None:
    arn = world.secret("plain")
    world.apply("plain", {"secretArn": arn})
    world.start_operator(extra_env=QUICK)
    world.wait_reason("plain", "AccessVerified")
    path, target = world.socket_path, f"/v1/credentials/{world.namespace}/plain"
    with _watch(world, "plain") as stream:
        (first,) = stream.wait_documents(1)
        assert stream.status == 200 and stream.headers["content-type"] == "application/x-ndjson"
        assert stream.headers["transfer-encoding"] == "chunked" and stream.headers["cache-control"] == "no-store"
        plain = request(path, target).json()
        assert first == {"status": 200, "credential": plain}  # the plain GET's body, with its status

        # Read again, same version: a new fetchedAt only, which is no change. Heartbeats meanwhile.
        assert request(path, f"{target}?refresh=true").json()["fetchedAt"] != plain["fetchedAt"]
        stream.wait(lambda s: len(s.heartbeats()) >= 2, 4 * HEARTBEAT, "two heartbeats")
        assert len(stream.documents()) == 1

        rotated = world.canary("rotated")
        version = world.aws.put_value(arn, string=rotated)
        asked = time.monotonic()
        assert request(path, f"{target}?refresh=true").json()["versionId"] == version
        answered = time.monotonic()
        second = stream.wait_documents(2)[1]
        arrived = next(line.at for line in stream.lines if line.data and line.document() == second)
        assert second["credential"]["versionId"] == version and second["credential"]["value"] == rotated
        assert second == {"status": 200, "credential": request(path, target).json()}

        world.delete("plain")
        deleted = stream.wait_documents(3, timeout=10)[2]
        assert _said(deleted) == (404, "NotFound") and set(deleted["error"]) == {"reason", "message"}
        gaps = [b.at - a.at for a, b in itertools.pairwise(stream.lines)]
    print(
        f"\na rotation reached the stream {(arrived - asked) * 1000:.0f} ms after the refresh was asked "
        f"({(arrived - answered) * 1000:+.0f} ms from its answer); longest silence {max(gaps):.2f}s"
    )
    assert max(gaps) < HEARTBEAT + 0.5, gaps


def test_a_stream_follows_availability_through_an_aws_outage(world: World) -> None:
    proxy, secret = world.proxy, f"{world.prefix}/flaky"
    process = world.start_operator(extra_env=QUICK)
    wait_until(lambda: request(world.socket_path, "/healthz").status == 200, timeout=20, message="not ready")
    proxy.fail_5xx(secret_id_contains=secret)
    with _watch(world, "flaky") as stream:
        stream.wait(lambda s: s.documents() and _said(s.documents()[-1]) == (404, "NotFound"), 10, "404 first")
        world.apply("flaky", {"secretArn": world.secret("flaky")})
        stream.wait(lambda s: _said(s.documents()[-1]) == (503, "AWSUnavailable"), 15, "503 AWSUnavailable")
        lines = len(stream.documents())
        # Retried with backoff: each failure has its own message, none is a change.
        failed = proxy.reads(secret)
        wait_until(lambda: proxy.reads(secret) >= failed + 3, timeout=15, message="no retries")
        assert len(stream.documents()) == lines
        proxy.clear()
        proxy.throttle(secret_id_contains=secret)
        stream.wait(lambda s: _said(s.documents()[-1]) == (503, "Throttled"), 15, "503 Throttled")
        proxy.clear()
        stream.wait(lambda s: _said(s.documents()[-1]) == (200, None), 15, "200 once AWS answers")
        said = [_said(document) for document in stream.documents()]
    assert all(a != b for a, b in itertools.pairwise(said)), said  # one line per change, no repeat
    assert said[-3:] == [(503, "AWSUnavailable"), (503, "Throttled"), (200, None)], said
    assert process.running


def test_shutdown_ends_streams_cleanly_after_the_drain(world: World) -> None:
    world.apply("plain", {"secretArn": world.secret("plain")})
    drain = 2.0
    process = world.start_operator(extra_env={**QUICK, "CCRED_WATCH_HEARTBEAT": "0.5s", "CCRED_SHUTDOWN_DRAIN": "2s"})
    world.wait_reason("plain", "AccessVerified")
    with _watch(world, "plain") as stream, _watch(world, "undeclared") as missing:
        stream.wait_documents(1)
        missing.wait_documents(1)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert stream.wait_end(timeout=15) == CLEAN and missing.wait_end(timeout=15) == CLEAN
        assert process.wait(timeout=15) == 0
    assert stream.ended_at is not None
    ended_in = stream.ended_at - sent
    print(f"\nthe streams ended {ended_in:.2f}s after SIGTERM (drain {drain:g}s), each with its last chunk")
    assert drain <= ended_in < drain + 3, ended_in
    # Through the drain: the value held is still what the stream says (no line), and it kept beating.
    assert len(stream.documents()) == 1 and len(missing.documents()) == 1
    assert len([line for line in stream.heartbeats() if line.at > sent]) >= 2


@contextlib.contextmanager
def _idle(path: str) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        yield sock


def _closed(sock: socket.socket, wait: float = 0.5) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_streams_are_never_closed_to_make_room_and_count_against_the_limit(world: World) -> None:
    arn = world.secret("plain")
    world.apply("plain", {"secretArn": arn})
    process = world.start_operator(extra_env={**QUICK, "CCRED_MAX_CONNECTIONS": "4", "CCRED_HEADER_TIMEOUT": "60"})
    world.wait_reason("plain", "AccessVerified")
    path = world.socket_path
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(_watch(world, "plain")) for _ in range(2)]
        for stream in streams:
            stream.wait_documents(1)
        idle = [stack.enter_context(_idle(path)) for _ in range(2)]  # at the limit: 2 streams, 2 idle
        for turn in range(4):  # each newcomer takes an idle one's place, never a stream's
            idle.append(stack.enter_context(_idle(path)))
            assert _closed(idle[turn], wait=5), f"idle connection {turn} was kept"
        assert not any(_closed(sock, wait=0.05) for sock in idle[-2:])
        streams += [stack.enter_context(_watch(world, "plain")) for _ in range(2)]  # the last idle ones go
        for stream in streams[2:]:
            stream.wait_documents(1)
        assert all(_closed(sock, wait=5) for sock in idle)
        # Four streams, every connection busy: a newcomer is closed at once, unanswered.
        assert exchange(path, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5).status is None
        version = world.aws.put_value(arn, string=world.canary("rotated"))
        streams[0].close()  # a stream that ends frees its place
        wait_until(lambda: request(path, "/healthz").status == 200, timeout=10, message="no room after a stream ended")
        assert request(path, f"/v1/credentials/{world.namespace}/plain?refresh=true").json()["versionId"] == version
        for stream in streams[1:]:
            assert stream.wait_documents(2)[1]["credential"]["versionId"] == version
            assert stream.end is None
        streams[1].wait(lambda s: s.heartbeats(), 3 * HEARTBEAT, "the stream went on beating")
    process.stop()
    said = "\n".join(line for line in process.output.splitlines() if "Closed socket connections" in line)
    assert "idle to make room" in said and "new at once" in said, said


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_does_not_read_is_given_up(world: World) -> None:
    big = world.canary("big")
    arn = world.secret("big", string=big + "x" * (65_536 - len(big)))
    world.apply("big", {"secretArn": arn})
    process = world.start_operator(extra_env=QUICK)
    world.wait_reason("big", "AccessVerified")
    assert process.pid is not None
    target = f"/v1/credentials/{world.namespace}/big?refresh=true"
    with _watch(world, "big", read=False) as stalled, _watch(world, "big") as reading:
        reading.wait_documents(1)
        before = _rss_kib(process.pid)
        rotations, started = 0, time.monotonic()
        while "watch streams whose client took no line" not in process.output:
            assert time.monotonic() - started < 60, f"still streaming to a client that reads nothing ({rotations})"
            value = f"{rotations:04d}" + big + "y" * (65_536 - len(big) - 4)
            world.canaries.append(value)
            world.aws.put_value(arn, string=value)
            assert request(world.socket_path, target).status == 200
            rotations += 1
        given_up_in = time.monotonic() - started
        after = _rss_kib(process.pid)
        end, received = stalled.read_to_end()
        assert end != CLEAN, "the stream of a client that does not read is cut, not ended"
        # The other stream, which reads, had every change.
        reading.wait(lambda s: len(s.documents()) >= rotations + 1, 10, "the reading stream fell behind")
    print(
        f"\na stream nobody reads was given up after {rotations} rotations of 64 KiB ({given_up_in:.1f}s), "
        f"{received // 1024} KiB of it in the kernel's buffer; RSS {before // 1024} -> {after // 1024} MiB"
    )
    assert "1 watch streams" in process.output
    assert after - before < 32 * 1024, (before, after)
    assert request(world.socket_path, "/healthz").status == 200


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_clients_watch_follows_across_an_operator_restart(world: World, kind: str) -> None:
    arn = world.secret("plain")
    first_value = world.canaries[-1]
    world.apply("plain", {"secretArn": arn})
    first = world.start_operator()
    world.wait_reason("plain", "AccessVerified")
    watcher = Watcher(kind, world.socket_path, world.namespace, "plain")
    try:
        item = watcher.next(timeout=15)
        assert isinstance(item, Credential) and item.value == first_value and watcher.watch.started
        assert first.stop() == 0
        assert isinstance(watcher.next(timeout=15), ServerUnreachable)  # once, while nobody serves
        rotated = world.canary("rotated")
        version = world.aws.put_value(arn, string=rotated)
        world.start_operator()
        item = watcher.next(timeout=30)
        assert isinstance(item, Credential) and (item.value, item.version_id) == (rotated, version)
        world.delete("plain")
        assert isinstance(watcher.next(timeout=15), CredentialNotFound)
    finally:
        watcher.close()


def _cli(world: World, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [console_script(), "get", "--watch", *args, "--socket-path", world.socket_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=hermetic_env(world.workdir / "cli-home"),
    )


class _Output:
    """A process's stdout and stderr, read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((process.stdout, self.out), (process.stderr, self.err))
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in iter(stream.readline, ""):
            into.append(line)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(5)


def test_get_watch_prints_each_change_until_interrupted(world: World) -> None:
    arn = world.secret("plain")
    world.start_operator(extra_env=QUICK)
    wait_until(lambda: request(world.socket_path, "/healthz").status == 200, timeout=20, message="not ready")
    cli = _cli(world, f"{world.namespace}/plain")
    output = _Output(cli)
    try:
        wait_until(lambda: any("error: NotFound: " in line for line in output.err), timeout=10, message="no 404")
        assert cli.poll() is None, "a stream that started does not end on a 404"
        world.apply("plain", {"secretArn": arn})
        wait_until(lambda: sum("versionId:" in line for line in output.out) == 1, timeout=15, message="no value")
        version = world.aws.put_value(arn, string=world.canary("rotated"))
        request(world.socket_path, f"/v1/credentials/{world.namespace}/plain?refresh=true")
        wait_until(lambda: f"versionId:  {version}\n" in output.out, timeout=10, message="no rotation")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=10) == 130
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait(timeout=10)
        output.join()
        for pipe in (cli.stdout, cli.stderr):
            if pipe is not None:
                pipe.close()
    printed = "".join(output.out)
    assert printed.count(f"name:       {world.namespace}/plain\n") == 2 and "value:      ******** (" in printed
    for canary in world.canaries:
        assert canary not in printed + "".join(output.err)


def test_get_watch_exits_as_get_when_the_stream_cannot_start(world: World) -> None:
    env = hermetic_env(world.workdir / "cli-home")

    def get_watch(target: str, socket_path: str) -> subprocess.CompletedProcess[str]:
        command = [console_script(), "get", "--watch", target, "--socket-path", socket_path]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env, check=False)

    gone = get_watch("ns/x", str(world.workdir / "none.sock"))
    assert gone.returncode == 1 and gone.stderr.startswith("error: ServerUnreachable: "), gone.stderr
    # An operator that does not let this uid read: refused when it connects, exit 2 like get's 403.
    world.start_operator(extra_env={"CCRED_ALLOWED_UIDS": str(os.getuid() + 4242)})
    refused = get_watch(f"{world.namespace}/x", world.socket_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: PermissionDenied: "), refused.stderr
