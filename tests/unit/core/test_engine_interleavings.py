"""Defects reproduced under interleavings (issue #17), each through the engine's public API: watch
events (upsert/remove), socket reads (serve) and the drain, with scripted ports."""

import asyncio
import json
import math
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason, find_condition
from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import FetchedSecret
from tests.support.fakes import FakePort, FakeSink, ScriptedPort, settle
from tests.unit.core.test_engine_hardening import base_settings

ROLE = "arn:aws:iam::111122223333:role/connector-reader"


def settings(**overrides: Any) -> OperatorSettings:
    # The hardening tests' settings, reads not held back by the refresh gap, and ROLE allowed.
    return base_settings(**{"min_refresh_gap": 0, "assumable_roles": [ROLE], **overrides})


def secret(name: str) -> str:
    return f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{name}-AbCdEf"


def credential(name: str, spec: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": name, "uid": uid or f"uid-{name}", "generation": 1},
        "spec": spec,
        "status": {},
    }


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_one_role_refused_batches_keeps_batching_for_every_other_identity() -> None:
    """Defect 2: the refusal was one global flag; it is per (region, role)."""
    port = ScriptedPort()
    port.refused_roles = {AssumedRole(ROLE)}
    engine = Engine(settings(), port, FakeSink())
    engine.synced.set()
    try:
        for i in range(20):
            engine.upsert(credential(f"cross{i}", {"secretArn": secret(f"x{i}"), "roleArn": ROLE}))
        await settle(engine)
        batches_before = len(port.batches)
        for i in range(20):
            engine.upsert(credential(f"own{i}", {"secretArn": secret(f"o{i}")}))
        await settle(engine)
        own = [name for name, _, _ in port.singles if name.startswith("o")]
        assert own == [], "reads as the operator's own identity went single after another role was refused"
        assert len(port.batches) == batches_before + 1
    finally:
        await engine.close()


async def test_a_stampede_of_socket_reads_at_start_rides_in_batches() -> None:
    """Defect 3: reads the controller waited on left their batch for the 2-thread lane as singles."""
    port = ScriptedPort()
    port.latency = 0.02
    engine = Engine(settings(aws_max_workers=8), port, FakeSink())
    engine.synced.set()
    try:
        n = 1000
        for i in range(n):
            engine.upsert(credential(f"c{i}", {"secretArn": secret(f"s{i}")}))
        served = await asyncio.wait_for(
            asyncio.gather(*(engine.serve("team-a", f"c{i}", refresh=False) for i in range(n))), 30
        )
        assert [s.status for s in served] == [200] * n
        assert port.singles == []
        assert len(port.batches) <= math.ceil(n / 20) + 10
    finally:
        await engine.close()


class GatedPort(ScriptedPort):
    """Holds single and batch reads of the secrets named in ``held`` until ``gate`` is set."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.gate.clear()
        self.holds = lambda names: bool(held & set(names))

    def get_secret(
        self, arn: SecretArn, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        if self.holds([arn.name]):
            self._enter()
            try:
                self.gate.wait(10)
            finally:
                self._leave()
        return super().get_secret(arn, version_id=version_id, version_stage=version_stage, role=role)


async def test_a_read_for_a_deleted_credential_never_reaches_its_successor() -> None:
    """Defect 4: delete and recreate under the same name while a socket read waits for AWS."""
    port = GatedPort({"old-AbCdEf"})
    sink = FakeSink()
    engine = Engine(settings(), port, sink)
    engine.synced.set()
    try:
        engine.upsert(credential("slack", {"secretArn": secret("old")}, uid="first"))
        waiting = asyncio.ensure_future(engine.serve("team-a", "slack", refresh=False))
        await until(lambda: port.running == 1)  # the read of the old secret is in AWS's hands
        engine.remove("team-a", "slack")
        engine.upsert(credential("slack", {"secretArn": secret("new")}, uid="second"))
        await settle(engine)
        port.gate.set()
        answered = await asyncio.wait_for(waiting, 5)
        await settle(engine)
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None and entry.api.uid == "second"
        assert entry.held.value is not None and entry.held.value.reveal() == "new-AbCdEf"
        assert answered.status == 200 and answered.value is not None and answered.value.reveal() == "new-AbCdEf"
        assert engine.redaction.redact("old-AbCdEf") == "old-AbCdEf", "the deleted secret's value is still indexed"
        assert [e.held.value.reveal() for e in engine.entries() if e.held.value is not None] == ["new-AbCdEf"]
        assert all(reason != "Rotated" for _, reason, _ in sink.events)
    finally:
        port.gate.set()
        await engine.close()


async def test_a_missing_json_key_then_a_transient_failure_is_not_ready() -> None:
    """Defect 5: dropping the value must drop its verification."""
    port = FakePort()
    sink = FakeSink()
    engine = Engine(settings(), port, sink)
    engine.synced.set()
    try:
        engine.upsert(credential("slack", {"secretArn": secret("s"), "jsonKey": "token"}))
        port.answer = FetchedSecret("v1", json.dumps({"token": "T0"}), ("AWSCURRENT",))
        await settle(engine)
        assert (await engine.serve("team-a", "slack", refresh=False)).status == 200
        port.answer = FetchedSecret("v2", json.dumps({"other": "x"}), ("AWSCURRENT",))
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None
        await engine.check(entry)
        await settle(engine)
        assert entry.schedule.outcome is not None and entry.schedule.outcome.reason == Reason.JSON_KEY_NOT_FOUND
        events_before = list(sink.events)
        port.answer = AwsFailure(Reason.AWS_UNAVAILABLE, "Secrets Manager did not answer.")
        await engine.check(entry)
        await settle(engine)
        outcome = entry.schedule.outcome
        assert outcome is not None and not outcome.ready, outcome
        ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
        assert ready is not None and ready["status"] == "False"
        served = await engine.serve("team-a", "slack", refresh=False)
        assert served.status == 503
        assert [e for e in sink.events[len(events_before) :] if e[1] == "AccessVerified"] == []
    finally:
        await engine.close()


@pytest.mark.parametrize("held", [False, True])
async def test_a_socket_read_waiting_for_aws_at_shutdown_is_answered(held: bool) -> None:
    """Defect 7: a read in flight at SIGTERM got a dropped connection (CancelledError), not the
    value held or 503 ShuttingDown."""
    port = GatedPort({"s-AbCdEf"})
    port.gate.set()
    engine = Engine(settings(min_refresh_gap=0), port, FakeSink())
    engine.synced.set()
    try:
        engine.upsert(credential("slack", {"secretArn": secret("s")}))
        if held:
            await settle(engine)
        port.gate.clear()
        waiting = asyncio.ensure_future(engine.serve("team-a", "slack", refresh=held))
        await until(lambda: port.running == 1)
        await engine.drain()
        served = await asyncio.wait_for(waiting, 2)
        if held:
            assert served.status == 503 and served.reason == "ShuttingDown"  # a refresh needs AWS
            assert (await engine.serve("team-a", "slack", refresh=False)).status == 200
        else:
            assert served.status == 503 and served.reason == "ShuttingDown"
    finally:
        port.gate.set()
        await engine.close()


async def test_a_bug_while_applying_an_answer_does_not_stop_the_schedule(caplog: pytest.LogCaptureFixture) -> None:
    """No check may die silently: the reader logs a bug and the credential is read again."""
    port = ScriptedPort()
    engine = Engine(settings(backoff_base=0.05, backoff_cap=0.1), port, FakeSink())
    engine.synced.set()
    calls = []
    original = engine._apply

    def flaky(entry: Any, done: Any) -> None:
        calls.append(done.seq)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        original(entry, done)

    engine._apply = flaky  # type: ignore[method-assign]
    try:
        engine.upsert(credential("slack", {"secretArn": secret("s")}))
        await until(lambda: len(calls) >= 2)
        await settle(engine)
        assert (await engine.serve("team-a", "slack", refresh=False)).status == 200
        assert any("failed unexpectedly (RuntimeError" in r.getMessage() for r in caplog.records)
    finally:
        await engine.close()


async def test_a_bug_in_the_status_writer_is_logged_and_the_write_still_lands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect 1's class: a status writer that dies (as the backoff overflow killed it) leaves the
    status unwritten for the process's life. Supervised, it is logged and started again."""
    sink = FakeSink()
    sink.fail_next = 1
    engine = Engine(settings(), FakePort(), sink)
    engine.synced.set()
    writer = engine._writer
    original = writer._after_failure
    failures: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> float:
        failures.append(1)
        if len(failures) == 1:
            raise OverflowError("a bug in the retry arithmetic")
        return original(*args, **kwargs)

    writer._after_failure = broken  # type: ignore[method-assign]
    try:
        engine.upsert(credential("slack", {"secretArn": secret("s")}))
        await until(lambda: ("team-a", "slack") in sink.objects and bool(sink.objects["team-a", "slack"]["status"]), 10)
        assert any(
            "Writing the status of team-a/slack failed unexpectedly (OverflowError" in r.getMessage()
            for r in caplog.records
        )
    finally:
        await engine.close()


async def test_steady_refresh_cycles_stay_at_one_call_per_twenty_credentials() -> None:
    """The credentials one call answered share their next jitter draw, so the next cycle reads them
    in one call again: ceil(N/20) calls per cycle, not a few more from batches left half full."""
    port = ScriptedPort()
    engine = Engine(settings(), port, FakeSink())
    engine.synced.set()
    try:
        for i in range(100):
            engine.upsert(credential(f"c{i:03d}", {"secretArn": secret(f"s{i}"), "refreshInterval": "5s"}))
        await until(lambda: sum(map(len, port.batches)) >= 100)
        first = len(port.batches)
        await until(lambda: sum(map(len, port.batches)) >= 300, timeout=20)  # two refresh cycles later
        assert first == 5
        assert port.singles == []
        assert sorted(map(len, port.batches[first:])) == [20] * 10, [len(b) for b in port.batches[first:]]
    finally:
        await engine.close()
