"""The engine's rules with a scripted AWS port and an in-memory status sink (pure logic, no I/O)."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason, find_condition
from connector_credentials.api.models import SecretArn
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import FetchedSecret
from connector_credentials.core.status import stable_identity
from connector_credentials.core.timing import capped_doubling
from tests.support.fakes import ARN, IDENTITY, VALUE, FakePort, FakeSink, body, settle

Script = Callable[[SecretArn], FetchedSecret]


@pytest.fixture
def settings() -> OperatorSettings:
    # min_refresh_gap=0: these tests ask for one refresh right after another and expect each to read;
    # the gap itself is tested in test_engine_hardening.py.
    return OperatorSettings(
        default_refresh_interval=300,
        max_staleness=900,
        backoff_base=1,
        backoff_cap=60,
        min_refresh_gap=0,
        socket_path="/nonexistent",
    )


@pytest.fixture
async def setup(settings: OperatorSettings) -> Any:
    port, sink = FakePort(), FakeSink()
    engine = Engine(settings, port, sink)
    engine.synced.set()
    yield engine, port, sink
    await engine.close()


async def test_a_role_outside_the_allowlist_is_refused_before_any_read(setup: Any) -> None:
    engine, port, sink = setup
    role = "arn:aws:iam::210987654321:role/connector-reader"
    engine.upsert(body({"secretArn": ARN, "roleArn": role}))
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "RoleNotAllowed")
    assert role in ready["message"] and port.calls == 0
    served = await engine.serve("team-a", "slack", refresh=False)
    assert served.status == 502 and served.reason == "RoleNotAllowed"


async def test_success_sets_ready_and_serves(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    status = sink.objects["team-a", "slack"]["status"]
    ready = find_condition(status["conditions"])
    assert ready is not None
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "AccessVerified", 1)
    assert status["versionId"] == "v1"
    assert status["observedGeneration"] == 1
    assert stable_identity(status["identityArn"]) == stable_identity(IDENTITY)
    assert status["credentialSource"] == "IRSA"
    assert sink.events == [(False, "AccessVerified", ready["message"])]
    served = await engine.serve("team-a", "slack", refresh=False)
    assert served.status == 200 and served.value is not None and served.value.reveal() == VALUE
    assert VALUE not in str(sink.patches) + str(sink.events)


async def test_checked_values_come_from_memory_and_refresh_goes_to_aws(setup: Any) -> None:
    engine, port, _ = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    assert port.calls == 1
    await engine.serve("team-a", "slack", refresh=False)  # just checked: younger than refreshInterval
    await engine.serve("team-a", "slack", refresh=False)
    assert port.calls == 1
    await engine.serve("team-a", "slack", refresh=True)
    assert port.calls == 2


async def test_concurrent_reads_share_one_aws_call(setup: Any) -> None:
    engine, port, _ = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    before = port.calls
    answers = await asyncio.gather(*(engine.serve("team-a", "slack", refresh=True) for _ in range(20)))
    assert {a.status for a in answers} == {200}
    assert port.calls - before <= 2


async def test_same_verdict_twice_writes_no_condition_and_posts_no_event(setup: Any) -> None:
    engine, _, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    engine.upsert({**body({"secretArn": ARN}), "status": sink.objects["team-a", "slack"]["status"]})
    patches_before = len(sink.patches)
    await engine.check(engine.get_entry("team-a", "slack"))
    await settle(engine)
    assert len(sink.patches) == patches_before  # last check is recent: nothing to write
    assert len(sink.events) == 1


async def test_a_second_replica_converges_without_writing(settings: OperatorSettings) -> None:
    sink = FakeSink()
    first, second = Engine(settings, FakePort(), sink), Engine(settings, FakePort(), sink)
    try:
        first.upsert(body({"secretArn": ARN}))
        await settle(first)
        patches = len(sink.patches)
        # The other replica sees the written status (as its watch would) and reaches the same verdict.
        second.upsert(body({"secretArn": ARN}, status=sink.objects["team-a", "slack"]["status"]))
        await settle(second)
        assert len(sink.patches) == patches
        assert len(sink.events) == 1
    finally:
        await first.close()
        await second.close()


async def test_rotation_is_noticed_and_reported(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    port.answer = FetchedSecret("v2", "CANARY-rotated", ("AWSCURRENT",))
    await engine.check(engine.get_entry("team-a", "slack"))
    await settle(engine)
    assert sink.objects["team-a", "slack"]["status"]["versionId"] == "v2"
    assert any(reason == "Rotated" and "v1 -> v2" in message for _, reason, message in sink.events)
    assert (await engine.serve("team-a", "slack", refresh=False)).value.reveal() == "CANARY-rotated"


async def test_permanent_failure_stops_serving(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    port.answer = AwsFailure(Reason.ACCESS_DENIED, "denied for role r")
    served = await engine.serve("team-a", "slack", refresh=True)
    assert (served.status, served.reason) == (502, "AccessDenied")
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert (ready["status"], ready["reason"]) == ("False", "AccessDenied")  # type: ignore[index]
    assert sink.events[-1][:2] == (True, "AccessDenied")


async def test_transient_failure_keeps_serving_within_max_staleness(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    port.answer = AwsFailure(Reason.THROTTLED, "Rate exceeded")
    served = await engine.serve("team-a", "slack", refresh=True)
    assert served.status == 200 and served.value.reveal() == VALUE
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert ready["status"] == "True" and "failed transiently (Throttled)" in ready["message"]  # type: ignore[index]
    assert [e[1] for e in sink.events] == ["AccessVerified"]  # no flapping events


async def test_transient_failure_beyond_max_staleness_turns_false_and_503(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    entry = engine.get_entry("team-a", "slack")
    entry.held.verified_mono -= 1300  # verified longer ago than interval (300s) + max_staleness (900s)
    port.answer = AwsFailure(Reason.AWS_UNAVAILABLE, "Secrets Manager failed to answer")
    served = await engine.serve("team-a", "slack", refresh=True)
    assert (served.status, served.reason) == (503, "AWSUnavailable")
    assert served.retry_after is not None and served.retry_after >= 1
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert (ready["status"], ready["reason"]) == ("False", "AWSUnavailable")  # type: ignore[index]
    # A refresh while the backoff runs does not call AWS (it answers the 503 again)...
    port.answer = FetchedSecret("v1", VALUE, ("AWSCURRENT",))
    calls = port.calls
    assert (await engine.serve("team-a", "slack", refresh=True)).status == 503
    assert port.calls == calls
    # ...and once it has run out, recovery returns to AccessVerified without a restart.
    entry.schedule.due = asyncio.get_running_loop().time()
    assert (await engine.serve("team-a", "slack", refresh=True)).status == 200
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert (ready["status"], ready["reason"]) == ("True", "AccessVerified")  # type: ignore[index]


@pytest.mark.parametrize("failures", [1025, 1100, 10**6])
def test_backoff_after_days_of_failures_is_the_cap_not_an_overflow(settings: OperatorSettings, failures: int) -> None:
    """#17 defect 1: ``2.0 ** 1024`` raised OverflowError (about 64 h of an AWS outage at the
    defaults) and the retrying task died; the status writer's retry had the same overflow."""
    engine = Engine(settings, FakePort(), FakeSink())
    try:
        assert 30 <= engine.timing.backoff(failures) <= 60
        assert capped_doubling(0.5, 30.0, failures) == 30.0
    finally:
        engine.reads.close()


def test_backoff_grows_with_jitter_and_is_capped(settings: OperatorSettings) -> None:
    engine = Engine(settings, FakePort(), FakeSink())
    try:
        for failures in range(1, 12):
            ceiling = min(60, 2 ** (failures - 1))
            delays = [engine.timing.backoff(failures) for _ in range(200)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays)
            assert len({round(d, 6) for d in delays}) > 100  # jittered, not synchronised
    finally:
        engine.reads.close()


async def test_invalid_spec_is_reported_without_calling_aws(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": "arn:aws:s3:::bucket/key"}))
    await settle(engine)
    assert port.calls == 0
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert ready["reason"] == "InvalidSpec" and "'s3' resource" in ready["message"]  # type: ignore[index]
    served = await engine.serve("team-a", "slack", refresh=False)
    assert (served.status, served.reason) == (502, "InvalidSpec")


async def test_spec_change_drops_the_value_and_rechecks(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    engine.upsert(body({"secretArn": ARN, "jsonKey": "token"}, generation=2))
    await settle(engine)
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert (ready["reason"], ready["observedGeneration"]) == ("JsonKeyNotFound", 2)  # type: ignore[index]
    assert (await engine.serve("team-a", "slack", refresh=False)).status == 502


async def test_status_writes_are_retried_until_accepted(setup: Any) -> None:
    engine, _, sink = setup
    sink.fail_next = 2
    engine.upsert(body({"secretArn": ARN}))
    for _ in range(400):
        await asyncio.sleep(0.01)
        if ("team-a", "slack") in sink.objects:
            break
    assert find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])["reason"] == "AccessVerified"  # type: ignore[index]


async def test_unknown_names_are_503_until_the_declared_ones_are_loaded(settings: OperatorSettings) -> None:
    engine = Engine(settings, FakePort(), FakeSink())
    try:
        served = await engine.serve("team-a", "nope", refresh=False)
        assert (served.status, served.reason, served.retry_after) == (503, "Pending", 1)
        engine.synced.set()
        assert (await engine.serve("team-a", "nope", refresh=False)).status == 404
    finally:
        await engine.close()


async def test_undeclared_and_removed_credentials_are_404(setup: Any) -> None:
    engine, _, _ = setup
    assert (await engine.serve("team-a", "nope", refresh=False)).status == 404
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    engine.remove("team-a", "slack")
    assert (await engine.serve("team-a", "slack", refresh=False)).status == 404
    assert [e for e in engine.entries() if e.held.value is not None] == []


def test_stable_identity_drops_the_session_name() -> None:
    assert stable_identity(IDENTITY) == "arn:aws:sts::123456789012:assumed-role/xpander-controller"
    assert stable_identity("arn:aws:iam::123456789012:user/bob") == "arn:aws:iam::123456789012:user/bob"


async def test_reads_of_a_failing_credential_do_not_call_aws_each_time(setup: Any) -> None:
    engine, port, _ = setup
    port.answer = AwsFailure(Reason.SECRET_NOT_FOUND, "no such secret")
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    calls = port.calls
    for _ in range(10):
        assert (await engine.serve("team-a", "slack", refresh=False)).status == 502
    assert port.calls == calls  # re-checked at refreshInterval, not per read
    port.answer = AwsFailure(Reason.THROTTLED, "Rate exceeded")
    await engine.serve("team-a", "slack", refresh=True)
    calls = port.calls
    for _ in range(10):
        served = await engine.serve("team-a", "slack", refresh=False)
        assert served.status == 503
        assert served.retry_after is not None
    assert port.calls == calls  # transient: the backoff retries, reads do not


async def test_a_stale_read_during_an_outage_serves_the_verified_value_quickly(setup: Any) -> None:
    engine, port, _ = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    await engine.serve("team-a", "slack", refresh=False)
    entry = engine.get_entry("team-a", "slack")
    entry.held.fetched_mono -= 400  # older than refreshInterval (300s)
    release = asyncio.Event()
    original = port.get_secret

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return original(*args, **kwargs)

    loop = asyncio.get_running_loop()
    port.get_secret = slow_read
    started = loop.time()
    served = await engine.serve("team-a", "slack", refresh=False)
    assert served.status == 200 and served.value.reveal() == VALUE
    assert loop.time() - started < engine.settings.serve_wait + 1
    release.set()
    await settle(engine)


async def test_an_object_gone_without_a_delete_event_is_forgotten(setup: Any) -> None:
    engine, _, sink = setup

    async def gone(namespace: str, name: str, status: dict[str, Any], resource_version: str | None) -> None:
        return None  # the API answers 404: deleted while the watch was not looking

    sink.patch_status = gone
    engine.upsert(body({"secretArn": ARN}))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if engine.get_entry("team-a", "slack") is None:
            break
    assert engine.get_entry("team-a", "slack") is None
    assert (await engine.serve("team-a", "slack", refresh=False)).status == 404


async def test_a_stale_body_does_not_roll_back_the_status(setup: Any) -> None:
    engine, _, sink = setup
    stale = body({"secretArn": ARN})
    stale["metadata"]["resourceVersion"] = "1"
    engine.upsert(stale)
    await settle(engine)
    first = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    await asyncio.sleep(1.1)  # a new transition would get a later timestamp
    engine.upsert(stale)  # e.g. a late listing, older than our own write
    await engine.check(engine.get_entry("team-a", "slack"))
    await settle(engine)
    now = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert now["lastTransitionTime"] == first["lastTransitionTime"]  # type: ignore[index]
    assert len(sink.events) == 1


async def test_the_newest_verdict_wins_over_a_write_in_flight(setup: Any) -> None:
    engine, port, sink = setup
    engine.upsert(body({"secretArn": ARN}))
    await settle(engine)
    entry = engine.get_entry("team-a", "slack")
    sink.gate = asyncio.Event()
    port.answer = AwsFailure(Reason.ACCESS_DENIED, "denied")
    await engine.check(entry)  # its status write blocks in the API
    await asyncio.sleep(0.05)
    port.answer = FetchedSecret("v1", VALUE, ("AWSCURRENT",))
    await engine.check(entry)  # agrees with the (old) live status
    sink.gate.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
        if ready["reason"] == "AccessVerified" and not entry.reporting.writing:  # type: ignore[index]
            break
    ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
    assert (ready["status"], ready["reason"]) == ("True", "AccessVerified")  # type: ignore[index]


def test_refreshes_are_spread_by_jitter(settings: OperatorSettings) -> None:
    engine = Engine(settings, FakePort(), FakeSink())
    try:
        delays = [engine.timing.jittered(300) for _ in range(500)]
        assert all(270 <= d <= 330 for d in delays)  # ±10% by default
        assert max(delays) - min(delays) > 40  # spread out, so a fleet does not refresh in step
    finally:
        engine.reads.close()


async def test_replicas_starting_together_post_one_event(settings: OperatorSettings) -> None:
    sink = FakeSink()
    sink.objects["team-a", "slack"] = {"status": {}, "metadata": {"resourceVersion": "1"}}
    first, second = Engine(settings, FakePort(), sink), Engine(settings, FakePort(), sink)
    try:
        seen = body({"secretArn": ARN})
        seen["metadata"]["resourceVersion"] = "1"
        # Both saw the object before either wrote: both reach AccessVerified as a transition.
        first.upsert(json.loads(json.dumps(seen)))
        second.upsert(json.loads(json.dumps(seen)))
        for _ in range(300):
            await asyncio.sleep(0.01)
            entries = [e for engine in (first, second) for e in engine.entries()]
            if all(e.reporting.reported is not None and not e.reporting.writing for e in entries):
                break  # both reported, and have nothing left to write
        else:
            raise AssertionError("a replica is still trying to write its status")
        assert [e[1] for e in sink.events] == ["AccessVerified"]  # the loser re-read and stood down
        ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
        assert ready["reason"] == "AccessVerified"  # type: ignore[index]
    finally:
        await first.close()
        await second.close()


async def test_a_replica_whose_write_is_retrying_when_another_reports_the_verdict_posts_no_event(
    settings: OperatorSettings,
) -> None:
    """Reproduced in tests/integration (two replicas starting together, about 1 run in 10): the
    second replica's first status write failed; before its retry, its watch showed the first
    replica's write of the same verdict; the retry then carried the new resourceVersion, was
    accepted, and the transition got a second Event."""
    sink = FakeSink()
    sink.objects["team-a", "slack"] = {"status": {}, "metadata": {"resourceVersion": "1"}}
    flaky = FakeSink()
    flaky.objects, flaky.events, flaky.fail_next = sink.objects, sink.events, 1
    second, first = Engine(settings, FakePort(), flaky), Engine(settings, FakePort(), sink)
    try:
        seen = body({"secretArn": ARN})
        seen["metadata"]["resourceVersion"] = "1"
        second.upsert(json.loads(json.dumps(seen)))
        for _ in range(300):  # its first write fails; it retries in 0.5 s
            await asyncio.sleep(0.01)
            if flaky.fail_next == 0:
                break
        first.upsert(json.loads(json.dumps(seen)))
        for _ in range(300):
            await asyncio.sleep(0.01)
            if sink.events:
                break
        watched = json.loads(json.dumps(sink.objects["team-a", "slack"]))
        second.upsert({**seen, "status": watched["status"], "metadata": {**seen["metadata"], **watched["metadata"]}})
        for _ in range(300):
            await asyncio.sleep(0.01)
            if all(not e.reporting.writing for engine in (first, second) for e in engine.entries()):
                break
        assert [e[1] for e in sink.events] == ["AccessVerified"]
    finally:
        await first.close()
        await second.close()


async def test_an_answer_for_an_old_spec_is_not_written_for_the_new_one(setup: Any) -> None:
    import threading

    engine, port, sink = setup
    release = threading.Event()
    original = port.get_secret

    def gated(*args: Any, **kwargs: Any) -> FetchedSecret:
        release.wait(timeout=10)
        return original(*args, **kwargs)

    port.get_secret = gated
    engine.upsert(body({"secretArn": ARN, "refreshInterval": "5s"}))
    await asyncio.sleep(0.1)  # the first read is in flight
    engine.upsert(body({"secretArn": ARN, "refreshInterval": "6s"}, generation=2))
    release.set()
    await settle(engine)
    for _ in range(100):
        ready = find_condition(sink.objects.get(("team-a", "slack"), {}).get("status", {}).get("conditions"))
        if ready is not None:
            break
        await asyncio.sleep(0.01)
    assert ready is not None
    assert ready["observedGeneration"] == 2
    assert "re-checked every 6s" in ready["message"]
    assert all("every 5s" not in str(p) for p in sink.patches)  # the old spec's answer was never written
