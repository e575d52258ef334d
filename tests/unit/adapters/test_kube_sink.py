"""The Kubernetes sink (aiohttp) against a small scripted API server on 127.0.0.1.

What the engine relies on: 404 on a status patch means gone (``None``), 409 is a
:class:`StatusConflict`, any other non-2xx raises with ``.status`` and ``.reason``; a 401 logs in
again once and retries; the merge patch carries the resourceVersion precondition.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web

from connector_credentials.adapters.kube import apiserver as kube
from connector_credentials.adapters.kube.apiserver import KubeApiError, KubeStatusSink, default_login
from connector_credentials.core.status import StatusConflict, _short_error
from tests.support.controlplane import _Pki

NS, NAME = "team-a", "slack"
OBJECT = f"/apis/connectors.xpander.ai/v1alpha1/namespaces/{NS}/connectorcredentials/{NAME}"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeApi:
    """Answers from a script (status, JSON body), else 200 with an empty object; records requests."""

    script: list[tuple[int, Any]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    delay: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""

    def answer(self, status: int, body: Any = None) -> None:
        self.script.append((status, body))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append(Seen(request.method, request.path, dict(request.headers), body, dict(request.query)))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        status, body = self.script.pop(0) if self.script else (200, {})
        if status >= 400 and body is None:
            body = _status_object(status)
        return web.json_response(body, status=status)


def _status_object(code: int) -> dict[str, Any]:
    reasons = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": f"the server says {code}\nover two lines",
        "reason": reasons.get(code, "InternalError"),
        "code": code,
    }


async def _serve(api: FakeApi, context: ssl.SSLContext | None = None) -> web.ServerRunner:
    runner = web.ServerRunner(web.Server(api.handle), handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock, ssl_context=context).start()
    api.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
    return runner


class Logins:
    """A login function: a new token each call (like a rotated service-account token)."""

    def __init__(self, server: str, **extra: Any) -> None:
        self.server, self.extra, self.calls = server, extra, 0
        self.fail = False

    @property
    def token(self) -> str:
        return f"token-{self.calls}"

    def __call__(self) -> kopf.ConnectionInfo:
        if self.fail:
            raise kopf.LoginError("no token file")
        self.calls += 1
        return kopf.ConnectionInfo(server=self.server, token=self.token, **self.extra)


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    runner = await _serve(fake)
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def logins(api: FakeApi) -> Logins:
    return Logins(api.url + "/")  # a trailing slash, as some kubeconfigs have it


@pytest.fixture
async def sink(logins: Logins) -> AsyncIterator[KubeStatusSink]:
    the_sink = KubeStatusSink(logins)
    try:
        yield the_sink
    finally:
        await the_sink.close()


# --- status patches -----------------------------------------------------------------------------


async def test_status_patch_is_a_merge_patch_with_the_resource_version_precondition(
    api: FakeApi, sink: KubeStatusSink
) -> None:
    api.answer(200, {"metadata": {"resourceVersion": "8"}, "status": {"versionId": "v1"}})
    body = await sink.patch_status(NS, NAME, {"versionId": "v1"}, "7")
    assert body == {"metadata": {"resourceVersion": "8"}, "status": {"versionId": "v1"}}
    [seen] = api.seen
    assert (seen.method, seen.path) == ("PATCH", OBJECT + "/status")
    assert seen.headers["Content-Type"] == "application/merge-patch+json"
    assert seen.headers["Accept"] == "application/json"
    assert seen.headers["Authorization"] == "Bearer token-1"
    assert seen.headers["User-Agent"].startswith("connector-credential-operator/")
    assert seen.body == {"status": {"versionId": "v1"}, "metadata": {"resourceVersion": "7"}}


async def test_status_patch_without_a_resource_version_has_no_precondition(api: FakeApi, sink: KubeStatusSink) -> None:
    await sink.patch_status(NS, NAME, {"versionId": "v1"}, None)
    assert api.seen[0].body == {"status": {"versionId": "v1"}}


async def test_status_patch_404_means_gone(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(404)
    assert await sink.patch_status(NS, NAME, {}, "7") is None


async def test_status_patch_409_is_a_conflict(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(409)
    with pytest.raises(StatusConflict, match="resourceVersion 7"):
        await sink.patch_status(NS, NAME, {}, "7")


@pytest.mark.parametrize(
    ("code", "phrase"),
    [(403, "Forbidden"), (422, "Unprocessable Entity"), (429, "Too Many Requests"), (500, "Internal Server Error")],
)
async def test_other_answers_raise_with_status_and_reason(
    api: FakeApi, sink: KubeStatusSink, code: int, phrase: str
) -> None:
    api.answer(code)
    with pytest.raises(KubeApiError) as caught:
        await sink.patch_status(NS, NAME, {}, "7")
    assert (caught.value.status, caught.value.reason) == (code, phrase)
    # The API server's message, on one line: what the CLI prints for a failed discovery.
    assert caught.value.message == f"the server says {code} over two lines"
    assert str(caught.value) == f"HTTP {code} {phrase}: the server says {code} over two lines"
    # What the status writer logs (and how it decides whether retrying can help).
    assert _short_error(caught.value) == f"HTTP {code} {phrase}"


async def test_a_non_json_error_body_still_raises_with_the_status(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(502, "Bad Gateway from a proxy")
    with pytest.raises(KubeApiError) as caught:
        await sink.get(NS, NAME)
    assert (caught.value.status, caught.value.reason, caught.value.message) == (502, "Bad Gateway", "")


async def test_a_long_error_message_is_shortened(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(422, {"kind": "Status", "message": "x" * 5000})
    with pytest.raises(KubeApiError) as caught:
        await sink.patch_status(NS, NAME, {}, None)
    assert len(caught.value.message) == kube.MAX_ERROR_MESSAGE
    assert caught.value.message.endswith("...")


# --- get, events, discovery, listing --------------------------------------------------------------


async def test_get_returns_the_object_or_none(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(200, {"metadata": {"name": NAME}})
    api.answer(404)
    api.answer(503)
    assert await sink.get(NS, NAME) == {"metadata": {"name": NAME}}
    assert await sink.get(NS, NAME) is None
    with pytest.raises(KubeApiError) as caught:
        await sink.get(NS, NAME)
    assert caught.value.status == 503
    assert [(s.method, s.path) for s in api.seen] == [("GET", OBJECT)] * 3
    assert "Content-Type" not in api.seen[0].headers


async def test_names_are_quoted_into_the_path(api: FakeApi, sink: KubeStatusSink) -> None:
    await sink.get("a/b", "c?d")
    assert api.seen[0].path.endswith("/namespaces/a/b/connectorcredentials/c?d")  # decoded by the server
    assert len(api.seen) == 1


async def test_an_event_is_json_and_names_its_object(api: FakeApi, sink: KubeStatusSink) -> None:
    await sink.post_event(NS, NAME, "uid-1", warning=True, reason="AccessDenied", message="m" * 2000)
    [seen] = api.seen
    assert (seen.method, seen.path) == ("POST", f"/api/v1/namespaces/{NS}/events")
    assert seen.headers["Content-Type"] == "application/json"
    event = seen.body
    assert event["metadata"]["name"].startswith(f"{NAME}.")
    assert len(event["metadata"]["name"]) == len(NAME) + 17
    assert event["involvedObject"] == {
        "apiVersion": "connectors.xpander.ai/v1alpha1",
        "kind": "ConnectorCredential",
        "name": NAME,
        "namespace": NS,
        "uid": "uid-1",
    }
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "AccessDenied", 1)
    assert len(event["message"]) == kube.MAX_EVENT_MESSAGE
    assert event["source"] == {"component": "connector-credential-operator"}


async def test_a_refused_event_raises(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(404)
    with pytest.raises(KubeApiError) as caught:
        await sink.post_event(NS, NAME, None, warning=False, reason="Verified", message="ok")
    assert caught.value.status == 404
    assert "uid" not in api.seen[0].body["involvedObject"]


async def test_crd_served_asks_discovery(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(200, {"kind": "APIResourceList", "resources": [{"name": "connectorcredentials"}]})
    api.answer(200, {"kind": "APIResourceList", "resources": [{"name": "something-else"}]})
    api.answer(404)
    api.answer(503)
    assert await sink.crd_served() is True
    assert await sink.crd_served() is False
    assert await sink.crd_served() is False
    with pytest.raises(KubeApiError):
        await sink.crd_served()
    assert {(s.method, s.path) for s in api.seen} == {("GET", "/apis/connectors.xpander.ai/v1alpha1")}


async def test_list_credentials_per_namespace_or_everywhere(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(200, {"items": [{"metadata": {"name": "a"}}]})
    api.answer(200, {"items": [{"metadata": {"name": "b"}}, "junk"]})
    api.answer(200, {"items": [{"metadata": {"name": "c"}}]})
    names = [i["metadata"]["name"] for i in await sink.list_credentials(["ns1", "ns2"])]
    assert names == ["a", "b"]
    assert [i["metadata"]["name"] for i in await sink.list_credentials(None)] == ["c"]
    assert [s.path for s in api.seen] == [
        "/apis/connectors.xpander.ai/v1alpha1/namespaces/ns1/connectorcredentials",
        "/apis/connectors.xpander.ai/v1alpha1/namespaces/ns2/connectorcredentials",
        "/apis/connectors.xpander.ai/v1alpha1/connectorcredentials",
    ]


async def test_the_listing_comes_a_page_at_a_time(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(200, {"metadata": {"continue": "tok/1+"}, "items": [{"metadata": {"name": "a"}}]})
    api.answer(200, {"metadata": {"continue": ""}, "items": [{"metadata": {"name": "b"}}]})
    pages = [[i["metadata"]["name"] for i in page.items] async for page in sink.credential_pages(["ns1"], limit=1)]
    assert pages == [["a"], ["b"]]
    assert [s.query for s in api.seen] == [{"limit": "1"}, {"limit": "1", "continue": "tok/1+"}]


async def test_each_listing_says_where_it_ends_and_at_which_resource_version(
    api: FakeApi, sink: KubeStatusSink
) -> None:
    # What the engine needs to forget what a listing lacks: its namespace, its snapshot, its end.
    api.answer(200, {"metadata": {"continue": "tok", "resourceVersion": "41"}, "items": [{"metadata": {"name": "a"}}]})
    api.answer(200, {"metadata": {"resourceVersion": "41"}, "items": [{"metadata": {"name": "b"}}]})
    api.answer(200, {"metadata": {"resourceVersion": "57"}, "items": []})
    api.answer(200, {"metadata": {"resourceVersion": "60"}, "items": [{"metadata": {"name": "c"}}]})
    pages = [
        (page.namespace, page.resource_version, page.last, len(page.items))
        async for page in sink.credential_pages(["ns1", "ns2"], limit=1)
    ]
    assert pages == [("ns1", "41", False, 1), ("ns1", "41", True, 1), ("ns2", "57", True, 0)]
    everywhere = [(page.namespace, page.resource_version, page.last) async for page in sink.credential_pages(None)]
    assert everywhere == [(None, "60", True)]


async def test_a_failed_listing_raises(api: FakeApi, sink: KubeStatusSink) -> None:
    api.answer(403)
    with pytest.raises(KubeApiError) as caught:
        await sink.list_credentials(["ns1"])
    assert caught.value.status == 403


# --- credentials -------------------------------------------------------------------------------


async def test_401_logs_in_again_once_and_retries(api: FakeApi, logins: Logins, sink: KubeStatusSink) -> None:
    api.answer(401)
    api.answer(200, {"metadata": {"name": NAME}})
    assert await sink.get(NS, NAME) == {"metadata": {"name": NAME}}
    assert logins.calls == 2
    assert [s.headers["Authorization"] for s in api.seen] == ["Bearer token-1", "Bearer token-2"]
    # The new token stays in use.
    await sink.get(NS, NAME)
    assert api.seen[-1].headers["Authorization"] == "Bearer token-2"
    assert logins.calls == 2


async def test_a_second_401_raises(api: FakeApi, logins: Logins, sink: KubeStatusSink) -> None:
    api.answer(401)
    api.answer(401)
    with pytest.raises(KubeApiError) as caught:
        await sink.patch_status(NS, NAME, {"versionId": "v1"}, "7")
    assert (caught.value.status, caught.value.reason) == (401, "Unauthorized")
    assert logins.calls == 2
    assert len(api.seen) == 2
    assert api.seen[1].body == api.seen[0].body  # the same request again


async def test_a_401_whose_login_fails_raises_the_401(api: FakeApi, logins: Logins, sink: KubeStatusSink) -> None:
    api.answer(401)
    logins.fail = True
    with pytest.raises(KubeApiError) as caught:
        await sink.get(NS, NAME)
    assert caught.value.status == 401
    assert len(api.seen) == 1
    logins.fail = False
    await sink.get(NS, NAME)  # the next request tries with what it has
    assert api.seen[-1].headers["Authorization"] == "Bearer token-1"


async def test_credentials_are_read_again_every_minute(
    api: FakeApi, logins: Logins, sink: KubeStatusSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sink.get(NS, NAME)
    assert logins.calls == 1
    monkeypatch.setattr(kube, "RELOGIN_INTERVAL", 0.0)
    await sink.get(NS, NAME)
    assert logins.calls == 2
    assert api.seen[-1].headers["Authorization"] == "Bearer token-2"
    # A failed re-read keeps the credentials held.
    logins.fail = True
    await sink.get(NS, NAME)
    assert api.seen[-1].headers["Authorization"] == "Bearer token-2"


async def test_a_token_change_keeps_the_tls_context_and_an_endpoint_change_does_not(
    logins: Logins, sink: KubeStatusSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = sink._credentials.tls
    monkeypatch.setattr(kube, "RELOGIN_INTERVAL", 0.0)
    assert sink._current().tls is first  # only the token changed
    logins.extra = {"insecure": True}
    assert sink._current().tls is not first


async def test_no_credentials_at_all_fail_at_construction() -> None:
    logins = Logins("http://127.0.0.1:1")
    logins.fail = True
    with pytest.raises(kopf.LoginError):
        KubeStatusSink(logins)


async def test_the_api_unreachable_raises_a_client_error() -> None:
    nowhere = KubeStatusSink(Logins("http://127.0.0.1:9"))  # discard: nothing listens there
    try:
        with pytest.raises(OSError):  # aiohttp.ClientConnectorError is an OSError
            await nowhere.get(NS, NAME)
    finally:
        await nowhere.close()


async def test_at_most_four_requests_are_in_flight(api: FakeApi, sink: KubeStatusSink) -> None:
    api.delay = 0.05
    await asyncio.gather(*(sink.get(NS, f"n{i}") for i in range(12)))
    assert api.most_in_flight == kube.MAX_IN_FLIGHT


async def test_close_is_idempotent_and_works_before_any_request(logins: Logins) -> None:
    unused = KubeStatusSink(logins)
    await unused.close()
    await unused.close()


async def test_close_closes_the_session(sink: KubeStatusSink) -> None:
    await sink.get(NS, NAME)
    session = sink._session
    assert session is not None
    await sink.close()
    assert session.closed


# --- logging in from the environment ----------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> _Pki:
    return _Pki(tmp_path)


async def test_tls_with_a_client_certificate_from_a_kubeconfig(
    pki: _Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubeconfig route kopf's login reads: CA and client certificate, verified both ways."""
    serving_cert, serving_key = pki.issue("server", "kube-apiserver", server=True)
    client_cert, client_key = pki.issue("client", "ccred-operator")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    context.load_cert_chain(serving_cert, serving_key)
    context.verify_mode = ssl.CERT_REQUIRED
    fake = FakeApi()
    runner = await _serve(fake, context)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "op",
        "contexts": [{"name": "op", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
        "clusters": [{"name": "c", "cluster": {"server": fake.url, "certificate-authority": str(pki.ca_file)}}],
        "users": [{"name": "u", "user": {"client-certificate": str(client_cert), "client-key": str(client_key)}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: None)  # in case this runs in a pod
    sink = KubeStatusSink()
    try:
        fake.answer(200, {"metadata": {"name": NAME}})
        assert await sink.get(NS, NAME) == {"metadata": {"name": NAME}}
        assert "Authorization" not in fake.seen[0].headers
    finally:
        await sink.close()
        await runner.cleanup()


async def test_an_unknown_ca_is_refused(pki: _Pki, tmp_path: Path) -> None:
    serving_cert, serving_key = pki.issue("server", "kube-apiserver", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(serving_cert, serving_key)
    fake = FakeApi()
    runner = await _serve(fake, context)
    sink = KubeStatusSink(Logins(fake.url))  # the system CAs only
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await sink.get(NS, NAME)
        assert fake.seen == []
    finally:
        await sink.close()
        await runner.cleanup()


def test_default_login_without_a_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: None)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(kopf.LoginError, match="no kubeconfig"):
        default_login()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(kopf.LoginError, match="FileNotFoundError"):
        default_login()


def test_default_login_prefers_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="sa")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: info)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert default_login() is info


@pytest.mark.parametrize(
    ("host", "server"), [("10.100.0.1", "https://10.100.0.1:443"), ("fd00:10::1", "https://[fd00:10::1]:443")]
)
def test_in_a_pod_the_api_server_is_its_service_address_not_a_dns_name(
    monkeypatch: pytest.MonkeyPatch, host: str, server: str
) -> None:
    """As client-go's in-cluster config: no cluster DNS is needed to reach the API server."""
    info = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="sa", ca_path="/ca.crt")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: info)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    logged_in = default_login()
    assert logged_in.server == server
    assert (logged_in.token, logged_in.ca_path) == ("sa", "/ca.crt")
