"""The socket client library, sync and async, against an in-test server that follows the contract."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import logging
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from connector_credentials.client import (
    DEFAULT_SOCKET_PATH,
    MASK,
    SOCKET_PATH_ENV,
    AsyncCredentialClient,
    Credential,
    CredentialClient,
    CredentialError,
    CredentialInfo,
    CredentialNotFound,
    CredentialTimeout,
    CredentialUnavailable,
    PermissionDenied,
    ProtocolError,
    ServerUnreachable,
    parse_retry_after,
    parse_rfc3339,
    resolve_socket_path,
)

T = TypeVar("T")

VALUE = "hunter2-Sup3r-s3cret-value"
BINARY = b"\x00\x01\xfe\xffbinary-secret-bytes"
BINARY_B64 = base64.b64encode(BINARY).decode()
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf"
VERSION = "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111"
FETCHED = "2024-05-06T07:08:09.123456789Z"
FETCHED_DT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------- servers


def _ok(value: str = VALUE, encoding: str | None = "text") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"value": value, "versionId": VERSION, "arn": ARN, "fetchedAt": FETCHED}
        if encoding is not None:
            body["encoding"] = encoding
        return web.json_response(body)

    return handler


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


def _error(status: int, reason: str, message: str, retry_after: str | None = None) -> Handler:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return _json(status, {"error": {"reason": reason, "message": message}}, headers)


def _text(status: int, text: str, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, content_type=content_type)

    return handler


async def _closing(request: web.Request) -> web.StreamResponse:
    response = await _ok()(request)
    response.force_close()
    return response


async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(2)
    return await _ok()(request)


def _canned() -> dict[str, Handler]:
    return {
        "db-password": _ok(),
        "tls-key": _ok(BINARY_B64, "base64"),
        "no-encoding": _ok(encoding=None),
        "missing": _error(404, "NotFound", "no ConnectorCredential default/missing is declared"),
        "denied": _error(502, "AccessDenied", "the operator's role may not read the secret"),
        "pending": _error(503, "Pending", "not resolved yet", retry_after="7"),
        "throttled": _error(503, "Throttled", "AWS throttled the request", retry_after="1.5"),
        "forbidden": _error(403, "Forbidden", "uid 1234 may not read credentials"),
        "bad-request": _error(400, "BadRequest", "refresh must be true or false"),
        "garbage": _text(200, '{"value": "' + VALUE + '", "versionId": '),
        "not-an-object": _json(200, ["nope"]),
        "nested-too-deep": _text(200, "[" * 100_000),
        "no-value": _json(200, {"versionId": VERSION, "arn": ARN, "fetchedAt": FETCHED}),
        "number-value": _json(200, {"value": 3, "versionId": VERSION, "arn": ARN, "fetchedAt": FETCHED}),
        "hex": _ok(encoding="hex"),
        "bad-base64": _ok(VALUE + "!", "base64"),
        "bad-time": _json(200, {"value": VALUE, "versionId": VERSION, "arn": ARN, "fetchedAt": "yesterday"}),
        "plain-500": _text(500, "500 Internal Server Error", "text/plain"),
        "error-no-reason": _json(502, {"error": {"message": "x"}}),
        "closing": _closing,
        "slow": _slow,
    }


class ContractServer:
    """An aiohttp app on a Unix socket in a background thread, answering like the operator."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers = _canned()
        self.requests: list[str] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.healthy = True
        self.credentials: list[dict[str, Any]] = [
            {
                "namespace": "default",
                "name": "db-password",
                "arn": ARN,
                "ready": True,
                "reason": "Ready",
                "message": "served",
                "versionId": VERSION,
                "fetchedAt": FETCHED,
            },
            {
                "namespace": "team-a",
                "name": "api.key",
                "arn": ARN,
                "ready": False,
                "reason": "Pending",
                "message": "not resolved yet",
                "versionId": None,
                "fetchedAt": None,
            },
        ]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/credentials", self._list)
        app.router.add_get("/v1/credentials/{namespace}/{name}", self._get)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.path).start()

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(request.raw_path)
        transport = request.transport
        if transport is not None and all(t is not transport for t in self.transports):
            self.transports.append(transport)
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response({"error": {"reason": "NotReady", "message": "starting"}}, status=503)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"credentials": self.credentials})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        handler = self.handlers.get(request.match_info["name"])
        if request.match_info["namespace"] != "default" or handler is None:
            return await _error(404, "NotFound", "not declared")(request)
        return await handler(request)

    @property
    def connections(self) -> int:
        return len(self.transports)

    def drop_connections(self) -> None:
        """Close every connection from the server side, as an idle keep-alive timeout would."""

        async def drop() -> None:
            for transport in self.transports:
                transport.close()
            await asyncio.sleep(0.05)

        self.call(drop())


class RawServer:
    """A Unix-socket server that answers each request with canned raw bytes (for HTTP edge cases)."""

    def __init__(self, path: str, answers: list[bytes], *, close: bool = True) -> None:
        self.path = path
        self.answers = list(answers)
        self.close_after = close
        self.accepted = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.listener.settimeout(0.05)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                while self.answers:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    if not head:
                        break
                    conn.sendall(self.answers.pop(0))
                    if self.close_after:
                        break

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.listener.close()


# --------------------------------------------------------------------------- fixtures


class AsyncFacade:
    """Drives an AsyncCredentialClient from sync test code, so that one test body covers both clients."""

    def __init__(self, client: AsyncCredentialClient) -> None:
        self.client = client
        self.runner = asyncio.Runner()

    def get(self, namespace: str, name: str, refresh: bool = False) -> Credential:
        return self.runner.run(self.client.get(namespace, name, refresh=refresh))

    def list(self) -> list[CredentialInfo]:
        return self.runner.run(self.client.list())

    def healthy(self) -> bool:
        return self.runner.run(self.client.healthy())

    def close(self) -> None:
        self.runner.run(self.client.aclose())

    def shutdown(self) -> None:
        self.close()
        self.runner.close()


Facade = CredentialClient | AsyncFacade
ClientFactory = Callable[..., Facade]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short on purpose: AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="ccred-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[ContractServer]:
    srv = ContractServer(str(sock_dir / "credentials.sock"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[ClientFactory]:
    made: list[Facade] = []

    def make(socket_path: str | None = None, timeout: float = 5.0) -> Facade:
        facade: Facade
        if request.param == "sync":
            facade = CredentialClient(socket_path, timeout=timeout)
        else:
            facade = AsyncFacade(AsyncCredentialClient(socket_path, timeout=timeout))
        made.append(facade)
        return facade

    yield make
    for facade in made:
        if isinstance(facade, AsyncFacade):
            facade.shutdown()
        else:
            facade.close()


@pytest.fixture
def client(make_client: ClientFactory, server: ContractServer) -> Facade:
    return make_client(server.path)


# --------------------------------------------------------------------------- values


def test_get_text(client: Facade, server: ContractServer) -> None:
    credential = client.get("default", "db-password")
    assert credential.value == VALUE
    assert credential.encoding == "text"
    assert credential.bytes_value == VALUE.encode()
    assert credential.as_bytes() == VALUE.encode()
    assert (credential.namespace, credential.name) == ("default", "db-password")
    assert credential.version_id == VERSION
    assert credential.arn == ARN
    assert credential.fetched_at == FETCHED_DT
    assert server.requests == ["/v1/credentials/default/db-password"]


def test_get_base64(client: Facade) -> None:
    credential = client.get("default", "tls-key")
    assert credential.encoding == "base64"
    assert credential.is_binary
    assert credential.value == BINARY_B64
    assert credential.bytes_value == BINARY
    assert credential.as_bytes() == BINARY


def test_absent_encoding_means_text(client: Facade) -> None:
    credential = client.get("default", "no-encoding")
    assert credential.encoding == "text"
    assert credential.value == VALUE


def test_refresh_is_sent(client: Facade, server: ContractServer) -> None:
    assert client.get("default", "db-password", refresh=True).value == VALUE
    client.get("default", "db-password")
    assert server.requests == [
        "/v1/credentials/default/db-password?refresh=true",
        "/v1/credentials/default/db-password",
    ]


def test_dotted_name_is_allowed_and_quoted(client: Facade, server: ContractServer) -> None:
    with pytest.raises(CredentialNotFound):
        client.get("default", "api.key-2")
    assert server.requests == ["/v1/credentials/default/api.key-2"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "kind", "reason", "status", "retry_after"),
    [
        ("missing", CredentialNotFound, "NotFound", 404, None),
        ("denied", CredentialUnavailable, "AccessDenied", 502, None),
        ("pending", CredentialUnavailable, "Pending", 503, 7.0),
        ("throttled", CredentialUnavailable, "Throttled", 503, 1.5),
        ("forbidden", PermissionDenied, "Forbidden", 403, None),
        ("bad-request", CredentialError, "BadRequest", 400, None),
    ],
)
def test_error_statuses(
    client: Facade, name: str, kind: type[CredentialError], reason: str, status: int, retry_after: float | None
) -> None:
    with pytest.raises(CredentialError) as caught:
        client.get("default", name)
    error = caught.value
    assert type(error) is kind
    assert error.reason == reason
    assert error.status == status
    assert error.message
    assert error.message in str(error)
    if isinstance(error, CredentialUnavailable):
        assert error.retry_after == retry_after
        assert error.transient is (status == 503)


def test_errors_survive_pickling() -> None:
    error = CredentialUnavailable("slow down", reason="Throttled", status=503, retry_after=2.0)
    clone = pickle.loads(pickle.dumps(error))
    assert (type(clone), clone.message, clone.reason, clone.status) == (
        CredentialUnavailable,
        "slow down",
        "Throttled",
        503,
    )
    assert clone.retry_after == 2.0
    assert clone.transient


def test_retry_after_forms() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("30", now=now) == 30.0
    assert parse_retry_after(" 2 ", now=now) == 2.0
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:10 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now=now) == 0.0
    for bad in (None, "", "soon", "-1", "nan", "inf"):
        assert parse_retry_after(bad, now=now) is None


@pytest.mark.parametrize(
    "name",
    [
        "garbage",
        "nested-too-deep",
        "not-an-object",
        "no-value",
        "number-value",
        "hex",
        "bad-base64",
        "bad-time",
        "plain-500",
        "error-no-reason",
    ],
)
def test_malformed_answers_are_protocol_errors(client: Facade, name: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        client.get("default", name)
    error = caught.value
    assert VALUE not in str(error)
    assert VALUE not in repr(error)
    # Nothing that holds the body (a JSON decoder error keeps the document) may hang off it.
    assert error.__cause__ is None
    assert error.__context__ is None


def test_malformed_list(client: Facade, server: ContractServer) -> None:
    server.credentials = [{"namespace": "default", "name": "x", "ready": "yes"}]
    with pytest.raises(ProtocolError, match="ready"):
        client.list()


# --------------------------------------------------------------------------- list, health


def test_list(client: Facade) -> None:
    ready, pending = client.list()
    assert ready == CredentialInfo(
        namespace="default",
        name="db-password",
        ready=True,
        arn=ARN,
        reason="Ready",
        message="served",
        version_id=VERSION,
        fetched_at=FETCHED_DT,
    )
    assert pending.ready is False
    assert (pending.reason, pending.version_id, pending.fetched_at) == ("Pending", None, None)


def test_healthy(client: Facade, server: ContractServer) -> None:
    assert client.healthy() is True
    server.healthy = False
    assert client.healthy() is False
    assert server.requests == ["/healthz", "/healthz"]


def test_healthy_without_server(make_client: ClientFactory, sock_dir: Path) -> None:
    assert make_client(str(sock_dir / "absent.sock")).healthy() is False


# --------------------------------------------------------------------------- connections


def test_keep_alive_reuses_one_connection(client: Facade, server: ContractServer) -> None:
    client.get("default", "db-password")
    client.get("default", "tls-key")
    client.list()
    client.healthy()
    with pytest.raises(CredentialNotFound):
        client.get("default", "missing")
    client.get("default", "db-password")
    assert len(server.requests) == 6
    assert server.connections == 1


def test_reconnects_after_server_closes_idle_connection(client: Facade, server: ContractServer) -> None:
    assert client.get("default", "db-password").value == VALUE
    server.drop_connections()
    assert client.get("default", "db-password").value == VALUE
    assert client.get("default", "tls-key").bytes_value == BINARY
    assert server.connections == 2


def test_connection_close_header(client: Facade, server: ContractServer) -> None:
    assert client.get("default", "closing").value == VALUE
    assert client.get("default", "db-password").value == VALUE
    assert server.connections == 2


def test_missing_socket(make_client: ClientFactory, sock_dir: Path) -> None:
    path = str(sock_dir / "absent.sock")
    with pytest.raises(ServerUnreachable) as caught:
        make_client(path).get("default", "db-password")
    message = str(caught.value)
    assert path in message
    assert "sidecar" in message
    assert "volume" in message
    assert caught.value.socket_path == path
    assert caught.value.status is None


def test_refused_socket(make_client: ClientFactory, sock_dir: Path) -> None:
    path = str(sock_dir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # bound, never listening: connections are refused
        with pytest.raises(ServerUnreachable, match="refuses connections"):
            make_client(path).get("default", "db-password")


def test_server_gone_after_first_request(make_client: ClientFactory, server: ContractServer) -> None:
    client = make_client(server.path)
    client.get("default", "db-password")
    server.stop()
    with pytest.raises(ServerUnreachable):
        client.get("default", "db-password")


def test_timeout(make_client: ClientFactory, server: ContractServer) -> None:
    client = make_client(server.path, timeout=0.2)
    with pytest.raises(CredentialTimeout) as caught:
        client.get("default", "slow")
    assert isinstance(caught.value, TimeoutError)
    # The timed-out connection is dropped; the client still works.
    assert client.get("default", "db-password").value == VALUE


def test_closed_client_refuses(make_client: ClientFactory, server: ContractServer) -> None:
    client = make_client(server.path)
    client.get("default", "db-password")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get("default", "db-password")


@pytest.mark.parametrize(
    ("namespace", "name"),
    [
        ("Default", "db"),
        ("default", "DB"),
        ("a.b", "db"),
        ("-default", "db"),
        ("default-", "db"),
        ("", "db"),
        ("default", ""),
        ("n" * 64, "db"),
        ("default", "a" * 254),
        ("default", "a/b"),
        ("default", ".."),
        ("default", "a..b"),
        ("default", "a_b"),
        ("default", "db\n"),
        ("default", "db?refresh=true"),
        ("default", "db%2F"),
        ("default", "déjà"),
    ],
)
def test_invalid_names_never_reach_the_server(
    make_client: ClientFactory, server: ContractServer, namespace: str, name: str
) -> None:
    client = make_client(server.path)
    with pytest.raises(ValueError, match="not a valid Kubernetes name"):
        client.get(namespace, name)
    # Checked before connecting: a client with no server behind it says the same.
    with pytest.raises(ValueError, match="not a valid Kubernetes name"):
        make_client("/nonexistent/ccred.sock").get(namespace, name)
    assert server.requests == []
    assert server.connections == 0


def test_longest_valid_names(client: Facade, server: ContractServer) -> None:
    with pytest.raises(CredentialNotFound):
        client.get("n" * 63, ".".join(["a" * 63] * 4)[:253].rstrip("."))
    assert len(server.requests) == 1


def test_socket_path_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SOCKET_PATH_ENV, raising=False)
    assert resolve_socket_path() == DEFAULT_SOCKET_PATH
    assert CredentialClient().socket_path == DEFAULT_SOCKET_PATH
    monkeypatch.setenv(SOCKET_PATH_ENV, "/run/x/creds.sock")
    assert CredentialClient().socket_path == "/run/x/creds.sock"
    assert AsyncCredentialClient().socket_path == "/run/x/creds.sock"
    assert CredentialClient(tmp_path / "a.sock").socket_path == str(tmp_path / "a.sock")


def test_sync_client_is_thread_safe(server: ContractServer) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                results.append(shared.get("default", "db-password").value)
        except BaseException as exc:
            errors.append(exc)

    with CredentialClient(server.path) as shared:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert results == [VALUE] * 80
    assert 1 <= server.connections <= 8
    assert shared.closed


@pytest.mark.parametrize("room_after", [0.3, None], ids=["room-made", "stays-full"])
def test_full_listen_backlog_is_waited_out(
    make_client: ClientFactory, sock_dir: Path, room_after: float | None
) -> None:
    # A full backlog fails a Unix connect at once (EAGAIN): the client waits for room, within its timeout.
    path = str(sock_dir / "full.sock")
    body = b'{"value": "v", "versionId": "1", "arn": "a", "fetchedAt": "2024-05-06T07:08:09Z"}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(path)
        listener.listen(1)
        queued: list[socket.socket] = []
        while True:
            filler = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            filler.setblocking(False)
            try:
                filler.connect(path)
            except BlockingIOError:
                break
            queued.append(filler)

        def make_room() -> None:
            time.sleep(room_after or 0)
            for filler in queued:
                filler.close()  # accepted below, they read as hung up at once
            listener.settimeout(5)
            while True:
                conn, _ = listener.accept()
                with conn:
                    if conn.recv(4096):
                        conn.sendall(answer)
                        return

        if room_after is not None:
            server = threading.Thread(target=make_room, daemon=True)
            server.start()
            stack.callback(server.join, 5)
        client = make_client(path, timeout=2.0)
        started = time.monotonic()
        if room_after is None:
            with pytest.raises(CredentialTimeout):
                client.get("default", "db-password")
            assert time.monotonic() - started >= 1.5
        else:
            assert client.get("default", "db-password").value == "v"
            assert time.monotonic() - started >= room_after / 2  # it waited: the backlog was full


# --------------------------------------------------------------------------- raw HTTP edge cases


def _answer(body: bytes, *head: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{version} {status}", *head]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


GOOD_BODY = (
    b'{"value": "'
    + VALUE.encode()
    + b'", "versionId": "'
    + VERSION.encode()
    + b'", "arn": "'
    + ARN.encode()
    + b'", "fetchedAt": "'
    + FETCHED.encode()
    + b'", "encoding": "text"}'
)


def _chunked(body: bytes) -> bytes:
    half = len(body) // 2
    parts = [body[:half], body[half:]]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        _answer(GOOD_BODY, f"Content-Length: {len(GOOD_BODY)}", version="HTTP/1.0"),
        _answer(GOOD_BODY, f"content-length: {len(GOOD_BODY)}", "X-Dup: a", "X-Dup: b"),
    ],
    ids=["http10", "lowercase-headers"],
)
def test_raw_http_framings(make_client: ClientFactory, sock_dir: Path, answer: bytes) -> None:
    raw = RawServer(str(sock_dir / "raw.sock"), [answer])
    try:
        assert make_client(raw.path).get("default", "db-password").value == VALUE
    finally:
        raw.stop()


@pytest.mark.parametrize(
    "answer",
    [
        _answer(GOOD_BODY[:10], f"Content-Length: {len(GOOD_BODY)}"),
        b"SPDY/9 200 OK\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        _answer(b"", "Content-Length: 1", "Content-Length: 2"),
        _answer(b"", "Content-Length: 999999999999"),
        _answer(b"", "Content-Length: \xb2"),
        "HTTP/1.1 \xb200 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1"),
        _answer(b"", "no colon here"),
    ],
    ids=[
        "truncated",
        "not-http",
        "bad-status",
        "conflicting-length",
        "huge",
        "unicode-length",
        "unicode-status",
        "bad-header",
    ],
)
def test_raw_http_malformed(make_client: ClientFactory, sock_dir: Path, answer: bytes) -> None:
    raw = RawServer(str(sock_dir / "raw.sock"), [answer])
    try:
        with pytest.raises(ProtocolError) as caught:
            make_client(raw.path).get("default", "db-password")
        # A partial read keeps the bytes it got (maybe a value): it must not hang off the error.
        assert caught.value.__context__ is None
        assert caught.value.__cause__ is None
    finally:
        raw.stop()


@pytest.mark.parametrize(
    "answer",
    [
        _answer(_chunked(GOOD_BODY), "Transfer-Encoding: chunked", "Content-Type: application/json"),
        _answer(GOOD_BODY, "Connection: close"),
        _answer(GOOD_BODY, "Transfer-Encoding: gzip"),
        _answer(_chunked(GOOD_BODY), f"Content-Length: {len(GOOD_BODY)}", "Transfer-Encoding: chunked"),
    ],
    ids=["chunked", "close-delimited", "unknown-transfer-encoding", "length-and-chunked"],
)
def test_answer_without_content_length_is_refused(make_client: ClientFactory, sock_dir: Path, answer: bytes) -> None:
    # The operator always sends Content-Length; anything else is refused at once, not read to the end.
    # The second (never requested) answer keeps the server holding the connection open meanwhile,
    # so waiting for the body's end would surface as a timeout instead.
    raw = RawServer(str(sock_dir / "raw.sock"), [answer, b"never sent"], close=False)
    try:
        with pytest.raises(ProtocolError, match="Content-Length") as caught:
            make_client(raw.path, timeout=2.0).get("default", "db-password")
        assert "operator always sends" in str(caught.value)
        assert caught.value.status == 200
        assert VALUE not in str(caught.value)
        assert caught.value.__context__ is None
    finally:
        raw.stop()


def test_fresh_connection_closed_without_answer(make_client: ClientFactory, sock_dir: Path) -> None:
    raw = RawServer(str(sock_dir / "raw.sock"), [b""])
    try:
        with pytest.raises(ServerUnreachable, match="closed the connection"):
            make_client(raw.path).get("default", "db-password")
        assert raw.accepted == 1  # a fresh connection is not retried
    finally:
        raw.stop()


# --------------------------------------------------------------------------- masking


def _credential(value: str = VALUE, encoding: str = "text") -> Credential:
    return Credential(
        namespace="default",
        name="db",
        value=value,
        encoding=encoding,  # type: ignore[arg-type]
        version_id=VERSION,
        arn=ARN,
        fetched_at=FETCHED_DT,
    )


@pytest.mark.parametrize(("value", "encoding"), [(VALUE, "text"), (BINARY_B64, "base64")])
def test_credential_repr_masks_value(value: str, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    credential = _credential(value, encoding)
    assert credential.value == value
    shown = [
        repr(credential),
        str(credential),
        f"{credential}",
        f"{credential!r}",
        f"{credential!s}",
        f"{credential:>200}",
        format(credential),
        "{}".format(credential),  # noqa: UP032
        repr([credential]),
        str({"c": credential}),
    ]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("credential %s %r", credential, credential)
    shown.append(caplog.text)
    for text in shown:
        assert value not in text
        assert MASK in text
        if encoding == "base64":
            assert "binary-secret" not in text
    assert "value='***'" in repr(credential)


def test_credential_resists_dumping() -> None:
    credential = _credential()
    with pytest.raises(TypeError):
        pickle.dumps(credential)
    with pytest.raises(TypeError):
        dataclasses.asdict(credential)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        vars(credential)
    assert copy.copy(credential) is credential
    assert copy.deepcopy(credential) is credential


def test_credential_is_immutable_and_comparable() -> None:
    credential = _credential()
    with pytest.raises(AttributeError):
        credential.value = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        credential._value = "other"
    with pytest.raises(AttributeError):
        credential.extra = 1
    with pytest.raises(AttributeError):
        del credential.name
    assert credential == _credential()
    assert hash(credential) == hash(_credential())
    assert credential != _credential("other")
    assert len({credential, _credential()}) == 1


def test_credential_rejects_bad_base64_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="base64") as caught:
        _credential("not base64 " + VALUE, "base64")
    assert VALUE not in str(caught.value)
    assert caught.value.__context__ is None
    with pytest.raises(ValueError, match="encoding"):
        _credential(VALUE, "hex")


# --------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-06T07:08:09Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T07:08:09.123456Z", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)),
        ("2024-05-06T07:08:09.5+02:00", datetime(2024, 5, 6, 7, 8, 9, 500000, tzinfo=timezone(timedelta(hours=2)))),
        (
            "2024-05-06 07:08:09.123456789-05:30",
            datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
    ],
)
def test_rfc3339(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["2024-05-06T07:08:09", "2024-05-06", "2024-13-01T00:00:00Z", "yesterday", ""])
def test_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


# --------------------------------------------------------------------------- async specifics


async def test_async_concurrent_requests(server: ContractServer) -> None:
    async with AsyncCredentialClient(server.path) as client:
        values = await asyncio.gather(*(client.get("default", "db-password") for _ in range(12)))
        assert [c.value for c in values] == [VALUE] * 12
        assert len(client._idle) <= 4
        # Sequential requests after the burst reuse idle connections: no new ones.
        before = server.connections
        for _ in range(3):
            await client.get("default", "tls-key")
        assert server.connections == before
    assert client.closed
    assert client._idle == []


async def test_async_cancellation_drops_the_connection(server: ContractServer) -> None:
    async with AsyncCredentialClient(server.path) as client:
        task = asyncio.create_task(client.get("default", "slow"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client._idle == []
        assert (await client.get("default", "db-password")).value == VALUE


async def test_async_list_and_health(server: ContractServer) -> None:
    async with AsyncCredentialClient(server.path, timeout=2) as client:
        assert await client.healthy()
        assert [info.name for info in await client.list()] == ["db-password", "api.key"]
        assert server.connections == 1


# --------------------------------------------------------------------------- the operator's own server


async def test_against_the_operators_server(sock_dir: Path) -> None:
    """Both clients against ``connector_credentials.adapters.socket.server`` itself, with a stub engine behind it."""
    server_module = pytest.importorskip("connector_credentials.adapters.socket.server")
    from connector_credentials.adapters.metrics.prometheus import Metrics
    from connector_credentials.api.values import SecretValue
    from connector_credentials.config.settings import OperatorSettings
    from connector_credentials.core.entry import Served

    refreshes: list[tuple[str, bool]] = []

    class StubEngine:
        metrics = Metrics()

        def cached_body(self, namespace: str, name: str) -> bytes | None:
            return None

        async def serve(self, namespace: str, name: str, refresh: bool = False) -> Served:
            refreshes.append((name, refresh))
            found = {
                "db-password": Served(200, SecretValue(VALUE), VERSION, ARN, FETCHED_DT),
                "tls-key": Served(200, SecretValue(BINARY), VERSION, ARN, FETCHED_DT),
                "throttled": Served(503, reason="Throttled", message="slow down", retry_after=3),
                "denied": Served(502, reason="AccessDenied", message="no"),
            }.get(name)
            return found or Served(404, reason="NotFound", message=f"No ConnectorCredential {namespace}/{name}")

        def describe(self) -> list[dict[str, Any]]:
            return [
                {
                    "namespace": "default",
                    "name": "db-password",
                    "arn": ARN,
                    "ready": True,
                    "reason": "Ready",
                    "message": "",
                    "versionId": VERSION,
                    "fetchedAt": FETCHED,
                },
            ]

    path = str(sock_dir / "operator.sock")
    settings = OperatorSettings(socket_path=path)
    operator = server_module.CredentialServer(settings, StubEngine(), lambda: True)
    await operator.start()
    try:

        async def check_async() -> None:
            async with AsyncCredentialClient(path) as client:
                assert (await client.get("default", "db-password", refresh=True)).value == VALUE
                assert (await client.get("default", "tls-key")).bytes_value == BINARY
                assert await client.healthy()
                assert [info.name for info in await client.list()] == ["db-password"]
                with pytest.raises(CredentialUnavailable) as caught:
                    await client.get("default", "throttled")
                assert (caught.value.reason, caught.value.retry_after, caught.value.transient) == (
                    "Throttled",
                    3.0,
                    True,
                )
                with pytest.raises(CredentialUnavailable) as caught:
                    await client.get("default", "denied")
                assert (caught.value.reason, caught.value.transient) == ("AccessDenied", False)
                with pytest.raises(CredentialNotFound):
                    await client.get("default", "absent")

        def check_sync() -> None:
            with CredentialClient(path) as client:
                credential = client.get("default", "db-password")
                assert credential.value == VALUE
                assert credential.fetched_at == FETCHED_DT
                assert client.get("default", "tls-key").bytes_value == BINARY
                assert client.healthy()
                with pytest.raises(CredentialUnavailable, match="slow down"):
                    client.get("default", "throttled")

        await check_async()
        # The server runs on this loop: the sync client must run in another thread.
        await asyncio.to_thread(check_sync)
    finally:
        await operator.close()
    assert ("db-password", True) in refreshes
    assert ("db-password", False) in refreshes


async def test_operators_server_refuses_other_uids(sock_dir: Path) -> None:
    server_module = pytest.importorskip("connector_credentials.adapters.socket.server")
    from connector_credentials.config.settings import OperatorSettings

    path = str(sock_dir / "operator.sock")
    settings = OperatorSettings(socket_path=path, allowed_uids=[os.getuid() + 1])
    from connector_credentials.adapters.metrics.prometheus import Metrics

    nothing = types.SimpleNamespace(metrics=Metrics())  # never asked: the peer is refused first
    operator = server_module.CredentialServer(settings, nothing, lambda: True)
    await operator.start()
    try:
        async with AsyncCredentialClient(path) as client:
            with pytest.raises(PermissionDenied) as caught:
                await client.get("default", "db-password")
            assert caught.value.status == 403
            assert caught.value.reason
    finally:
        await operator.close()
