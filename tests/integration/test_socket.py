"""The credential socket through the real operator: lifecycle, peer uid, the HTTP contract, the CLI.

Every request goes over the operator's Unix socket, either raw (to see status lines and headers
exactly as sent) or through the client library and the console script.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from connector_credentials.client import CredentialClient
from tests.integration.conftest import World
from tests.support.rawhttp import NOBODY, as_uid, assert_error, request
from tests.support.runner import console_script, hermetic_env, wait_until

# --------------------------------------------------------------------------- CLI


def cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = hermetic_env(world.workdir / "cli-home")
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=30, env=env, check=False)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- tests


@pytest.mark.skipif(os.geteuid() != 0, reason="checking SO_PEERCRED refusals needs root to become other uids")
def test_socket_file_lifecycle_and_allowed_uids(world: World) -> None:
    os.chmod(world.workdir, 0o755)  # other uids must traverse to the socket
    arn = world.secret("plain")
    world.apply("plain", {"secretArn": arn})
    value = world.canaries[-1]

    # Refusals at start, all at once: a regular file, a live listener, modes with "other" bits.
    not_a_socket = world.workdir / "file.sock"
    not_a_socket.write_text("keep me", encoding="utf-8")
    taken = str(world.workdir / "taken.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(taken)
        listener.listen(1)
        taken_inode = os.stat(taken).st_ino
        refused = {
            "file": (world.start_operator(socket_path=str(not_a_socket), wait=False), "is not a socket"),
            "live": (world.start_operator(socket_path=taken, wait=False), "another process is serving on"),
            "0666": (
                world.start_operator(
                    socket_path=str(world.workdir / "m1.sock"), extra_env={"CCRED_SOCKET_MODE": "0666"}, wait=False
                ),
                "socket mode 0666 would let any local user read credentials",
            ),
            "0661": (
                world.start_operator(
                    socket_path=str(world.workdir / "m2.sock"), extra_env={"CCRED_SOCKET_MODE": "0661"}, wait=False
                ),
                "socket mode 0661 would let any local user read credentials",
            ),
        }
        for label, (process, phrase) in refused.items():
            code = process.wait(timeout=20)
            assert code != 0, (label, process.output[-2000:])
            assert phrase in process.output, (label, process.output[-2000:])
            assert "Serving credentials on" not in process.output, label
        assert refused["0666"][0].returncode == 2  # click's usage error: "Error: invalid settings: ..."
        assert "Error: invalid settings" in refused["0666"][0].output
        assert not (world.workdir / "m1.sock").exists() and not (world.workdir / "m2.sock").exists()
        assert not_a_socket.read_text(encoding="utf-8") == "keep me"
        assert os.stat(taken).st_ino == taken_inode  # the live listener's socket was left alone

    # A stale socket (bound, then its process went away) is replaced. --socket-path beats the env
    # variable; CCRED_SOCKET_MODE and CCRED_ALLOWED_UIDS are honoured.
    stale = str(world.workdir / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(stale)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, contextlib.suppress(ConnectionRefusedError):
        probe.connect(stale)
        raise AssertionError("the stale socket should refuse connections")
    process = world.start_operator(
        socket_path=str(world.workdir / "env.sock"),
        args=("--socket-path", stale),
        extra_env={"CCRED_SOCKET_MODE": "0770", "CCRED_ALLOWED_UIDS": f"0,{NOBODY}"},
    )
    assert "Removing the stale socket" in process.output
    assert not (world.workdir / "env.sock").exists()
    assert stat.S_ISSOCK(os.stat(stale).st_mode)  # replaced (inode numbers may be reused: not compared)
    assert _mode(stale) == 0o770
    world.wait_reason("plain", "AccessVerified")

    target = f"/v1/credentials/{world.namespace}/plain"
    pid, (nobody_reply, nobody_health) = as_uid(stale, NOBODY, target, "/healthz")
    assert nobody_reply.status == 200 and nobody_reply.json()["value"] == value
    assert nobody_health.status == 200
    stranger_pid, (stranger_reply,) = as_uid(stale, 4242, target)
    error = assert_error(stranger_reply, 403, "PermissionDenied")
    assert value not in stranger_reply.text()
    line = process.wait_for_log(f"from pid {stranger_pid} uid 4242", timeout=5)
    assert "CCRED_ALLOWED_UIDS" in line and "Refused a connection" in line  # refused at accept: no path read
    assert f"uid {NOBODY}" not in process.output and f"pid {pid} " not in process.output
    assert value not in json.dumps(error)
    assert request(stale, target).json()["value"] == value  # root (uid 0) is in the list too

    # At exit the operator removes its own socket, and exits cleanly.
    assert process.stop() == 0
    assert not os.path.exists(stale)


def test_socket_contract(world: World) -> None:
    proxy, ns, path = world.proxy, world.namespace, world.socket_path
    os.chmod(world.workdir, 0o755)
    plain_arn = world.secret("plain")
    plain_value = world.canaries[-1]
    token = world.canary("token")
    keyed_arn = world.secret("keyed", string=json.dumps({"api_token": token, "port": 5432}))
    blob = world.canary("blob").encode() + b"\x00\xff\xfe\x10binary"
    blob_arn = world.secret("blob", binary=blob)
    big_canary = world.canary("big")
    big_value = big_canary + "x" * (65_536 - len(big_canary))  # Secrets Manager's maximum: 64 KiB
    world.apply("big", {"secretArn": world.secret("big", string=big_value)})
    denied_arn = world.secret("denied")
    proxy.deny(secret_id_contains=f"{world.prefix}/denied")
    proxy.throttle(secret_id_contains=f"{world.prefix}/throttled")
    world.apply("plain", {"secretArn": plain_arn, "refreshInterval": "1h"})
    world.apply("keyed", {"secretArn": keyed_arn, "jsonKey": "api_token"})
    world.apply("port", {"secretArn": keyed_arn, "jsonKey": "port"})
    world.apply("blob", {"secretArn": blob_arn})
    world.apply("denied", {"secretArn": denied_arn})
    world.apply(
        "gone", {"secretArn": f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{world.prefix}/gone-AbCdEf"}
    )
    world.apply("throttled", {"secretArn": world.secret("throttled")})
    # A short backoff cap: "throttled" retries by itself within seconds once the throttling ends.
    process = world.start_operator(extra_env={"CCRED_BACKOFF_CAP": "4s"})
    assert _mode(path) == 0o660 and stat.S_ISSOCK(os.stat(path).st_mode)
    for name in ("plain", "keyed", "port", "blob", "big"):
        world.wait_reason(name, "AccessVerified")
    world.wait_reason("denied", "AccessDenied")
    world.wait_reason("gone", "SecretNotFound")
    world.wait_reason("throttled", "Throttled")
    error_bodies: list[bytes] = []

    # --- values, and freshness: refresh=true is real time; else the cache, younger than refreshInterval.
    def calls() -> int:
        return proxy.reads(f"{world.prefix}/plain")

    before = calls()
    first = request(path, f"/v1/credentials/{ns}/plain")
    assert first.status == 200 and first.version == "HTTP/1.1"
    assert first.headers["cache-control"] == "no-store" and first.headers["x-content-type-options"] == "nosniff"
    assert first.headers["content-type"].startswith("application/json")
    body = first.json()
    assert set(body) == {"value", "versionId", "arn", "fetchedAt", "encoding"}
    assert body["value"] == plain_value and body["encoding"] == "text" and body["arn"] == plain_arn
    assert body["versionId"] == world.status("plain")["versionId"]
    fetched = datetime.datetime.fromisoformat(body["fetchedAt"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.UTC) - fetched).total_seconds()) < 5
    # The operator checked it a moment ago: the first read through the socket is served from memory.
    assert calls() == before, "a value younger than refreshInterval is served from memory (one read per check)"
    assert request(path, f"/v1/credentials/{ns}/plain").json()["fetchedAt"] == body["fetchedAt"]
    assert calls() == before, "a value younger than refreshInterval is served from memory"
    rotated = world.canary("rotated")
    new_version = world.aws.put_value(plain_arn, string=rotated)
    cached = request(path, f"/v1/credentials/{ns}/plain").json()
    assert (cached["value"], cached["versionId"]) == (plain_value, body["versionId"])
    assert calls() == before
    for refresh in ("true", "1", "TRUE"):
        fresh = request(path, f"/v1/credentials/{ns}/plain?refresh={refresh}").json()
        assert (fresh["value"], fresh["versionId"]) == (rotated, new_version)
    assert calls() == before + 3, "each refresh=true reads AWS"
    after = request(path, f"/v1/credentials/{ns}/plain?refresh=false").json()
    assert after["value"] == rotated and calls() == before + 3
    head = request(path, f"/v1/credentials/{ns}/plain", method="HEAD")
    assert head.status == 200 and head.headers["cache-control"] == "no-store"
    assert rotated.encode() not in head.raw

    keyed = request(path, f"/v1/credentials/{ns}/keyed").json()
    assert (keyed["value"], keyed["encoding"], keyed["arn"]) == (token, "text", keyed_arn)
    assert request(path, f"/v1/credentials/{ns}/port").json()["value"] == "5432"
    binary = request(path, f"/v1/credentials/{ns}/blob").json()
    assert binary["encoding"] == "base64" and base64.b64decode(binary["value"]) == blob
    with world.client() as client:
        assert client.get(ns, "blob").as_bytes() == blob
        assert client.get(ns, "big").value == big_value

    # --- errors: documented statuses, reasons and shape; never a value.
    for target, status, reason in [
        (f"/v1/credentials/{ns}/undeclared", 404, "NotFound"),
        ("/v1/credentials/other-ns/plain", 404, "NotFound"),
        (f"/v1/credentials/{ns}/denied", 502, "AccessDenied"),
        (f"/v1/credentials/{ns}/gone", 502, "SecretNotFound"),
        ("/", 404, "NotFound"),
        ("/v1", 404, "NotFound"),
        ("/v2/credentials/a/b", 404, "NotFound"),
        ("/healthz/x", 404, "NotFound"),
        (f"/v1/credentials/{ns}", 400, "BadRequest"),
        (f"/v1/credentials/{ns}/plain/extra", 400, "BadRequest"),
        (f"/v1/credentials/{ns}/Plain", 400, "BadRequest"),
        (f"/v1/credentials/{ns}/under_score", 400, "BadRequest"),
        (f"/v1/credentials/{ns}/-plain", 400, "BadRequest"),
        ("/v1/credentials/NS/plain", 400, "BadRequest"),
        (f"/v1/credentials/{ns}/plain?refresh=yes", 400, "BadRequest"),
    ]:
        reply = request(path, target)
        error = assert_error(reply, status, reason)
        error_bodies.append(reply.raw)
        if status == 502:
            assert error["message"] == world.ready(target.rsplit("/", 1)[-1])["message"]  # type: ignore[index]
            assert "retry-after" not in reply.headers
    throttled = request(path, f"/v1/credentials/{ns}/throttled")
    assert_error(throttled, 503, "Throttled")
    assert 1 <= int(throttled.headers["retry-after"]) <= 300
    error_bodies.append(throttled.raw)
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
        for target in (f"/v1/credentials/{ns}/plain", "/healthz"):
            reply = request(path, target, method=method)
            assert_error(reply, 405, "MethodNotAllowed")
            assert reply.headers["allow"] == "GET, HEAD"
            error_bodies.append(reply.raw)

    listed = request(path, "/v1/credentials")
    assert listed.status == 200 and listed.headers["cache-control"] == "no-store"
    rows = {row["name"]: row for row in listed.json()["credentials"]}
    assert set(rows) == {"plain", "keyed", "port", "blob", "big", "denied", "gone", "throttled"}
    assert all(row["namespace"] == ns for row in rows.values())
    assert {name for name, row in rows.items() if row["ready"]} == {"plain", "keyed", "port", "blob", "big"}
    assert (rows["denied"]["reason"], rows["gone"]["reason"]) == ("AccessDenied", "SecretNotFound")
    assert rows["plain"]["versionId"] == new_version and rows["denied"]["versionId"] is None
    assert all("value" not in row for row in rows.values())
    error_bodies.append(listed.raw)
    health = request(path, "/healthz")
    assert (health.status, health.json(), health.headers["cache-control"]) == (200, {"status": "ok"}, "no-store")

    # --- a uid that is not allowed (default: only the operator's own uid) gets 403 everywhere.
    if os.geteuid() == 0:  # becoming another uid needs root; test_socket_file_lifecycle says so when skipped
        pid, replies = as_uid(path, NOBODY, f"/v1/credentials/{ns}/plain", "/v1/credentials", "/healthz", "/nope")
        for reply in replies:
            assert_error(reply, 403, "PermissionDenied")
            error_bodies.append(reply.raw)
        line = process.wait_for_log(f"from pid {pid} uid {NOBODY}", timeout=5)
        assert f"/v1/credentials/{ns}/plain" not in line  # refused when it connected, before its request was read
        # Four refusals inside the 10 s window from one uid: one log line, the rest counted.
        assert process.output.count("Refused a connection") == 1

    # --- the CLI, through the same socket.
    with ThreadPoolExecutor(5) as pool:
        got, shown, failed, missing, listing = pool.map(
            lambda args: cli(world, *args),
            [
                ("get", f"{ns}/plain", "--socket-path", path),
                ("get", f"{ns}/plain", "--socket-path", path, "--show"),
                ("get", f"{ns}/denied", "--socket-path", path),
                ("get", f"{ns}/undeclared", "--socket-path", path),
                ("list", "--socket-path", path),
            ],
        )
    assert got.returncode == 0, got.stderr
    for phrase in (f"{ns}/plain", plain_arn, new_version, "encoding:   text", f"({len(rotated)} chars"):
        assert phrase in got.stdout, phrase
    assert rotated not in got.stdout + got.stderr
    assert shown.returncode == 0 and f"value:      {rotated}" in shown.stdout
    assert failed.returncode == 1 and failed.stderr.startswith("error: AccessDenied: ")
    assert missing.returncode == 2 and missing.stderr.startswith("error: NotFound: ")
    assert listing.returncode == 0, listing.stderr
    header, *table = listing.stdout.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "READY", "REASON", "VERSION"]
    assert len(table) == 8
    assert any(row.split()[1:4] == ["denied", "False", "AccessDenied"] for row in table)
    assert any(row.split()[1:5] == ["plain", "True", "AccessVerified", new_version] for row in table)
    error_bodies += [failed.stderr.encode(), missing.stderr.encode(), listing.stdout.encode(), got.stdout.encode()]

    # --- concurrency: 32 clients x 20 requests, all answered.
    statuses: list[int] = []
    lock = threading.Lock()

    def hammer(index: int) -> None:
        with CredentialClient(path, timeout=15) as client:
            for turn in range(20):
                name = ("keyed", "blob", "plain", "port")[(index + turn) % 4]
                credential = client.get(ns, name)
                assert credential.value
                with lock:
                    statuses.append(200)

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(hammer, range(32)))
    hammer_seconds = time.monotonic() - started
    assert len(statuses) == 640
    print(f"\n640 concurrent requests (32 clients x 20) answered in {hammer_seconds:.2f}s")

    # --- clients that go away: before the answer, after a few bytes, in the middle of a large one.
    big_request = f"GET /v1/credentials/{ns}/big HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    for _ in range(10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(f"GET /v1/credentials/{ns}/plain?refresh=true HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(f"GET /v1/credentials/{ns}/keyed HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(5) == b"HTTP/"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(big_request * 40)  # ~2.4 MB of answers pipelined: more than the socket buffers
            assert sock.recv(16).startswith(b"HTTP/1.1 200")
    assert process.running
    health_started = time.monotonic()
    assert request(path, "/healthz").status == 200
    assert time.monotonic() - health_started < 1.0
    assert request(path, f"/v1/credentials/{ns}/big").json()["value"] == big_value
    with world.client() as client:
        assert client.healthy()
        assert client.get(ns, "keyed").value == token

    # --- a fix on the AWS side: picked up at once by refresh=true for a permanent reason (denied);
    #     a transient one (throttled) is not hurried by refresh=true (test_hardening.py): its retry picks it up.
    proxy.clear()
    recovered = request(path, f"/v1/credentials/{ns}/denied?refresh=true")
    assert recovered.status == 200 and recovered.json()["value"].startswith("CANARY-denied-")
    wait_until(
        lambda: request(path, f"/v1/credentials/{ns}/throttled").status == 200,
        timeout=10,
        message="throttled did not recover when its backoff ran out",
    )
    assert request(path, f"/v1/credentials/{ns}/throttled").json()["value"].startswith("CANARY-throttled-")

    # --- the canary search, extended to every error body and CLI output collected above.
    for canary in world.canaries:
        for text in error_bodies:
            assert canary.encode() not in text, "a secret value appeared in an error answer"


def test_declared_credential_is_never_404_once_healthy(world: World) -> None:
    for index in range(3):
        world.apply(f"c{index}", {"secretArn": world.secret(f"c{index}")})
    world.start_operator()
    target = f"/v1/credentials/{world.namespace}/c2"
    answers: list[tuple[float, int | None, int | None]] = []
    started = time.monotonic()
    while time.monotonic() - started < 10:
        health = request(world.socket_path, "/healthz").status
        answer = request(world.socket_path, target).status
        answers.append((round(time.monotonic() - started, 3), health, answer))
        if answer == 200:
            break
    print(f"\nafter start (seconds, /healthz, credential): first {answers[0]}, last {answers[-1]}")
    assert answers[-1][2] == 200
    # A declared credential may be 503 Pending (Retry-After) while the watch starts; never 404
    # "not declared" once /healthz reports the operator ready: a controller would take it as final.
    wrong = [entry for entry in answers if entry[1] == 200 and entry[2] == 404]
    assert not wrong, f"{len(wrong)} answers of 404 while healthy, for {wrong[-1][0]}s after start"
