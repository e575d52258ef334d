"""The metrics: the engine collector, the AWS hooks, the status counter, the endpoint, the setting."""

from __future__ import annotations

import asyncio
from typing import Any

import boto3
import prometheus_client
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from connector_credentials.adapters.metrics.prometheus import Metrics, MetricsServer, aws_outcome
from connector_credentials.api.conditions import Reason
from connector_credentials.api.values import SecretValue
from connector_credentials.cli.main import main
from connector_credentials.config.settings import OperatorSettings, parse_bind_address
from connector_credentials.core.engine import Engine
from connector_credentials.core.entry import Entry, Outcome
from connector_credentials.core.failures import AwsFailure
from tests.support.fakes import ARN, VALUE, FakePort, FakeSink, StubEngine, body, settle


def scraped(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    text, _ = metrics.render()
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for have, v in found.get(name, []) if all(have.get(k) == want for k, want in labels.items()))


def entry(name: str, outcome: Outcome | None, fetched: float | None = None) -> Entry:
    item = Entry(namespace="team-a", name=name)
    item.schedule.outcome = outcome
    if fetched is not None:
        item.held.value = SecretValue(VALUE)
        item.held.fetched_mono = fetched
        item.held.version_id = "version-that-must-not-show"
    return item


def test_the_engine_collector_reports_each_credential_its_age_and_the_watch() -> None:
    entries = [
        entry("slack", Outcome(True, Reason.ACCESS_VERIFIED, "ok"), fetched=100.0),
        entry("denied", Outcome(False, Reason.ACCESS_DENIED, "no")),
        entry("new", None),
    ]
    connected = [True]
    metrics = Metrics()
    metrics.watch(StubEngine(entries), lambda: connected[0], clock=lambda: 130.5)  # type: ignore[arg-type]
    found = scraped(metrics)
    assert sorted(
        (labels["name"], labels["reason"], labels["ready"], v) for labels, v in found["ccred_credentials"]
    ) == [
        ("denied", "AccessDenied", "false", 1.0),
        ("new", "Pending", "false", 1.0),
        ("slack", "AccessVerified", "true", 1.0),
    ]
    assert found["ccred_value_age_seconds"] == [({"namespace": "team-a", "name": "slack"}, 30.5)]
    assert total(found, "ccred_watch_connected") == 1
    connected[0] = False
    assert total(scraped(metrics), "ccred_watch_connected") == 0
    text = metrics.render()[0].decode()
    assert VALUE not in text and "version-that-must-not-show" not in text


def test_a_failing_connected_check_reads_as_disconnected() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    metrics = Metrics()
    metrics.watch(StubEngine([]), broken, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert total(scraped(metrics), "ccred_watch_connected") == 0


def test_its_own_registry_starts_at_zero_and_leaves_the_global_one_alone() -> None:
    first, second = Metrics(), Metrics()
    first.socket_requests.labels("200").inc()
    assert total(scraped(second), "ccred_socket_requests_total", code="200") == 0
    assert total(scraped(first), "ccred_socket_requests_total", code="200") == 1
    global_names = {family.name for family in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("ccred_") for name in global_names)
    found = scraped(second)
    # Known label values are there from the start (rate() and alerts work from the first scrape).
    assert total(found, "ccred_aws_requests_total", operation="GetSecretValue", outcome="throttled") == 0
    assert ({"operation": "BatchGetSecretValue", "outcome": "ok"}, 0.0) in found["ccred_aws_requests_total"]
    assert ({"result": "conflict"}, 0.0) in found["ccred_status_writes_total"]


def test_the_rotation_queue_gauge_is_exported_only_with_a_queue() -> None:
    # An alert on it being 0 must not fire on every pod that has no queue.
    assert "ccred_rotation_queue_receiving" not in scraped(Metrics())
    with_queue = Metrics(rotation_queue=True)
    assert scraped(with_queue)["ccred_rotation_queue_receiving"] == [({}, 0.0)]  # not read yet
    with_queue.rotation_queue(None)
    assert scraped(with_queue)["ccred_rotation_queue_receiving"] == [({}, 1.0)]
    with_queue.rotation_queue("denied")
    assert scraped(with_queue)["ccred_rotation_queue_receiving"] == [({}, 0.0)]
    assert total(scraped(with_queue), "ccred_rotation_queue_errors_total", reason="denied") == 1


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, "", "ok"),
        (400, "ThrottlingException", "throttled"),
        (429, "", "throttled"),
        (400, "AccessDeniedException", "denied"),
        (403, "AccessDenied", "denied"),
        (400, "ResourceNotFoundException", "not_found"),
        (400, "InvalidRequestException", "client_error"),
        (503, "ServiceUnavailable", "server_error"),
        (None, "", "network_error"),
    ],
)
def test_aws_outcomes(status: int | None, code: str, outcome: str) -> None:
    assert aws_outcome(status, code) == outcome


def test_every_aws_call_of_an_instrumented_client_is_counted_and_timed() -> None:
    metrics = Metrics()
    client = boto3.client("secretsmanager", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    metrics.instrument_client(client)
    with Stubber(client) as stub:
        stub.add_response(
            "get_secret_value", {"SecretString": VALUE, "VersionId": "v" * 32, "ARN": ARN}, {"SecretId": ARN}
        )
        stub.add_client_error("get_secret_value", "AccessDeniedException", http_status_code=400)
        stub.add_client_error("batch_get_secret_value", "ThrottlingException", http_status_code=400)
        client.get_secret_value(SecretId=ARN)
        with pytest.raises(client.exceptions.ClientError):
            client.get_secret_value(SecretId=ARN)
        with pytest.raises(client.exceptions.ClientError):
            client.batch_get_secret_value(SecretIdList=[ARN])
    found = scraped(metrics)
    assert total(found, "ccred_aws_requests_total", operation="GetSecretValue", outcome="ok") == 1
    assert total(found, "ccred_aws_requests_total", operation="GetSecretValue", outcome="denied") == 1
    assert total(found, "ccred_aws_requests_total", operation="BatchGetSecretValue", outcome="throttled") == 1
    text = metrics.render()[0].decode()
    assert VALUE not in text and "v" * 32 not in text


def test_a_call_that_never_got_an_answer_is_a_network_error() -> None:
    metrics = Metrics()
    context: dict[str, Any] = {}
    metrics._aws_started(context=context)
    metrics._aws_failed(context=context, event_name="after-call-error.sts.GetCallerIdentity")
    found = scraped(metrics)
    assert total(found, "ccred_aws_requests_total", operation="GetCallerIdentity", outcome="network_error") == 1
    assert total(found, "ccred_aws_request_duration_seconds_count", operation="GetCallerIdentity") == 1


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(min_refresh_gap=0, socket_path="/nonexistent")


async def test_the_engine_counts_status_writes_and_reports_its_credentials(settings: OperatorSettings) -> None:
    port, sink = FakePort(), FakeSink()
    engine = Engine(settings, port, sink, metrics=Metrics())
    engine.metrics.watch(engine, lambda: True)
    try:
        sink.fail_next = 1
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        for _ in range(100):
            if total(scraped(engine.metrics), "ccred_status_writes_total", result="ok"):
                break
            await asyncio.sleep(0.05)
        found = scraped(engine.metrics)
        assert total(found, "ccred_status_writes_total", result="failed") == 1
        assert total(found, "ccred_status_writes_total", result="ok") == 1
        assert found["ccred_credentials"] == [
            ({"namespace": "team-a", "name": "slack", "reason": "AccessVerified", "ready": "true"}, 1.0)
        ]
        port.answer = AwsFailure(Reason.ACCESS_DENIED, "denied")
        await engine.serve("team-a", "slack", refresh=True)
        await settle(engine)
        found = scraped(engine.metrics)
        assert found["ccred_credentials"] == [
            ({"namespace": "team-a", "name": "slack", "reason": "AccessDenied", "ready": "false"}, 1.0)
        ]
        assert "ccred_value_age_seconds" not in found  # the value was dropped
    finally:
        await engine.close()


async def test_the_endpoint_serves_metrics_and_nothing_else() -> None:
    import aiohttp

    metrics = Metrics()
    metrics.socket_requests.labels("404").inc()
    server = MetricsServer(metrics, "127.0.0.1", 0)
    await server.start()
    try:
        host, port = server.bound[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert 'ccred_socket_requests_total{code="404"} 1.0' in await response.text()
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with session.get(f"http://{host}:{port}/metrics", headers=headers) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await response.text()).rstrip().endswith("# EOF")
            async with session.get(f"http://{host}:{port}/") as response:
                assert response.status == 404
            async with session.post(f"http://{host}:{port}/metrics") as response:
                assert response.status == 405
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("0", None),
        ("", None),
        (":8080", (None, 8080)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:8081", ("::1", 8081)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_bind_addresses(address: str, parsed: tuple[str | None, int] | None) -> None:
    assert parse_bind_address(address) == parsed


@pytest.mark.parametrize("address", ["8080", "host:port", ":70000", "localhost"])
def test_bad_bind_addresses_are_refused_as_settings(address: str) -> None:
    with pytest.raises(ValidationError):
        OperatorSettings(metrics_bind_address=address)


def test_the_default_is_controller_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCRED_METRICS_BIND_ADDRESS", raising=False)
    assert OperatorSettings().metrics_bind_address == ":8080"
    monkeypatch.setenv("CCRED_METRICS_BIND_ADDRESS", "0")
    assert OperatorSettings().metrics_bind_address == "0"


def test_the_same_port_as_the_liveness_endpoint_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCRED_METRICS_BIND_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["run", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert result.exit_code == 2
    assert "same port 8080" in result.output
    result = CliRunner().invoke(main, ["run", "--metrics-bind-address", "nonsense"])
    assert result.exit_code == 2
    assert "metrics_bind_address" in result.output


async def test_the_loop_takes_a_snapshot_and_a_thread_renders_it() -> None:
    entries = [entry("slack", Outcome(True, Reason.ACCESS_VERIFIED, "ok"), fetched=1.0)]
    metrics = Metrics()
    metrics.watch(StubEngine(entries), lambda: True, clock=lambda: 3.0)  # type: ignore[arg-type]
    snapshot = metrics.snapshot()
    entries.clear()  # the engine changes after the snapshot: the scrape says what the snapshot saw
    text, _ = await asyncio.get_running_loop().run_in_executor(None, metrics.render, None, snapshot)
    assert 'ccred_value_age_seconds{name="slack",namespace="team-a"} 2.0' in text.decode()
    assert "ccred_credentials{" not in metrics.render()[0].decode()  # read now: nothing declared
