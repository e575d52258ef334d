"""Rotation events (core/rotation.py) and what the engine does with them and with other replicas'
status: read at once what moved, within the gap and the backoff, batched, and only that."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import SecretArn
from connector_credentials.core import rotation
from connector_credentials.core.engine import Engine
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import NoMeter
from connector_credentials.core.reads import ReadKey
from connector_credentials.core.rotation import LabelMoved, Refused, parse_event
from tests.support.fakes import FakeSink, ScriptedPort, settle
from tests.unit.core.test_engine_interleavings import credential, secret, settings, until

ARN = "arn:aws:secretsmanager:us-west-2:012345678901:secret:mySecret-a1b2c3"


def event(arn: str = ARN, *, label: str = "AWSCURRENT", version: str = "v2", **changes: Any) -> dict[str, Any]:
    """The shape AWS documents ("Secret event notifications"), as EventBridge hands it to SQS."""
    name = arn.rsplit(":", 1)[-1][:-7]
    body = {
        "version": "0",
        "id": "e1",
        "detail-type": "Secret Label Updated",
        "source": "aws.secretsmanager",
        "account": "012345678901",
        "time": "2026-12-06T10:00:00Z",
        "region": "us-west-2",
        "resources": [arn],
        "detail": {"name": name, "labelUpdated": label, "versionId": version},
    }
    body.update(changes)
    return body


def key(arn: str, *, stage: str | None = None, version_id: str | None = None) -> ReadKey:
    return ReadKey(SecretArn.parse(arn), version_id, stage, None)


# --- parsing ------------------------------------------------------------------------------------


def test_the_documented_event_is_parsed() -> None:
    moved = parse_event(json.dumps(event()))
    assert (moved.arn.arn, moved.name, moved.label, moved.version_id) == (ARN, "mySecret", "AWSCURRENT", "v2")
    assert moved.time == datetime.datetime(2026, 12, 6, 10, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("body", "kind", "outcome"),
    [
        ("{" * 20_000, "oversized", rotation.MALFORMED),
        ("not json", "not-json", rotation.MALFORMED),
        ("[" * rotation.MAX_EVENT_BYTES, "not-json", rotation.MALFORMED),  # nests past the decoder's recursion
        (b"\xff\xfe", "not-json", rotation.MALFORMED),
        ("[1, 2]", "not-an-object", rotation.MALFORMED),
        (json.dumps(event(**{"detail-type": "Secret Value Updated"})), "another-event", rotation.IGNORED),
        (json.dumps(event(source="aws.ec2")), "another-event", rotation.IGNORED),
        (json.dumps(event(detail="x")), "wrong-shape", rotation.MALFORMED),
        (json.dumps(event(resources=[])), "wrong-shape", rotation.MALFORMED),
        (json.dumps(event(resources=[ARN, ARN])), "wrong-shape", rotation.MALFORMED),
        (json.dumps(event(resources=["arn:aws:s3:::bucket"])), "wrong-shape", rotation.MALFORMED),
        (json.dumps(event(detail={"name": "mySecret", "labelUpdated": "AWSCURRENT"})), "wrong-shape", "malformed"),
        (json.dumps(event(detail={"name": "n", "labelUpdated": 7, "versionId": "v"})), "wrong-shape", "malformed"),
    ],
)
def test_what_is_not_an_event_is_refused_by_kind(body: str | bytes, kind: str, outcome: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_event(body)
    assert (refused.value.kind, refused.value.outcome) == (kind, outcome)


def test_a_time_without_zone_or_not_a_time_is_no_time() -> None:
    assert parse_event(json.dumps(event(time="2026-12-06T10:00:00"))).time is None
    assert parse_event(json.dumps(event(time="yesterday"))).time is None


def test_what_an_event_moves() -> None:
    moved = parse_event(json.dumps(event()))
    assert moved.moves(key(ARN))  # no stage: AWSCURRENT
    assert moved.moves(key(ARN, stage="AWSCURRENT"))
    assert moved.moves(key("arn:aws:secretsmanager:us-west-2:012345678901:secret:mySecret"))  # no suffix
    assert not moved.moves(key(ARN, stage="blue"))  # another label
    assert not moved.moves(key(ARN, version_id="v1"))  # a pinned version never moves
    assert not moved.moves(key("arn:aws:secretsmanager:us-west-2:210987654321:secret:mySecret-a1b2c3"))
    assert not moved.moves(key("arn:aws:secretsmanager:us-east-1:012345678901:secret:mySecret-a1b2c3"))
    assert not moved.moves(key("arn:aws:secretsmanager:us-west-2:012345678901:secret:mySecretTwo-a1b2c3"))
    blue = parse_event(json.dumps(event(label="blue")))
    assert blue.moves(key(ARN, stage="blue")) and not blue.moves(key(ARN))


# --- the engine -----------------------------------------------------------------------------------


class Recorded(NoMeter):
    def __init__(self) -> None:
        self.delivered: list[float] = []

    def rotation_delivered(self, seconds: float) -> None:
        self.delivered.append(seconds)


def moved(arn: str, version: str = "v2", *, at: datetime.datetime | None = None) -> LabelMoved:
    parsed = SecretArn.parse(arn)
    return LabelMoved(parsed, parsed.name[:-7], "AWSCURRENT", version, at)


async def resolved(ticket: asyncio.Future[None], within: float) -> bool:
    """Whether a watch's ticket resolved within ``within`` seconds (as the socket's watch waits)."""
    done, _ = await asyncio.wait({asyncio.ensure_future(asyncio.shield(ticket))}, timeout=within)
    return bool(done)


def reads_of(port: ScriptedPort, name: str) -> int:
    return sum(batch.count(name) for batch in port.batches) + sum(1 for n, _, _ in port.singles if n == name)


async def test_an_event_reads_what_it_moved_at_once_in_one_batch_and_nothing_else() -> None:
    port, meter = ScriptedPort(), Recorded()
    engine = Engine(settings(), port, FakeSink(), metrics=meter)
    engine.synced.set()
    a, b, other = secret("a"), secret("b"), secret("other")
    try:
        engine.upsert(credential("a1", {"secretArn": a, "refreshInterval": "1h"}))
        engine.upsert(credential("a2", {"secretArn": a, "refreshInterval": "1h"}))
        engine.upsert(credential("b", {"secretArn": b, "refreshInterval": "1h"}))
        engine.upsert(credential("a-blue", {"secretArn": a, "versionStage": "blue", "refreshInterval": "1h"}))
        engine.upsert(credential("other", {"secretArn": other, "refreshInterval": "1h"}))
        await settle(engine)
        before = {name: reads_of(port, name) for name in ("a-AbCdEf", "b-AbCdEf", "other-AbCdEf")}
        port.versions[a] = port.versions[b] = "v2"
        published = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
        assert engine.rotated(moved(a, at=published)) == rotation.REFRESHED
        assert engine.rotated(moved(b)) == rotation.REFRESHED
        await until(lambda: all(engine.current("team-a", n).version_id == "v2" for n in ("a1", "a2", "b")))
        await settle(engine)
        # One batch carried both events' reads; the "blue" label did not move: not read again.
        assert port.batches[-1] == ["a-AbCdEf", "b-AbCdEf"]
        assert reads_of(port, "a-AbCdEf") == before["a-AbCdEf"] + 1
        assert reads_of(port, "b-AbCdEf") == before["b-AbCdEf"] + 1
        assert reads_of(port, "other-AbCdEf") == before["other-AbCdEf"]
        assert len(meter.delivered) == 1 and 1.0 <= meter.delivered[0] < 5.0
        # The same event again (SQS delivers at least once): held already, nothing is read.
        assert engine.rotated(moved(a)) == rotation.CURRENT
        assert engine.rotated(moved(secret("nobody"))) == rotation.UNDECLARED
        await settle(engine)
        assert reads_of(port, "a-AbCdEf") == before["a-AbCdEf"] + 1
    finally:
        await engine.close()


async def test_an_event_respects_the_refresh_gap_and_the_backoff() -> None:
    port = ScriptedPort()
    engine = Engine(settings(min_refresh_gap=30), port, FakeSink())
    engine.synced.set()
    a, failing = secret("a"), secret("failing")
    port.failing[failing] = AwsFailure(Reason.AWS_UNAVAILABLE, "Secrets Manager is down.", transient=True)
    try:
        engine.upsert(credential("a", {"secretArn": a, "refreshInterval": "1h"}))
        await settle(engine)
        # Read a moment ago: the event's read waits for the end of the gap (planned, not made).
        assert engine.reads.busy(within=31) == 0
        assert engine.rotated(moved(a)) == rotation.REFRESHED
        assert engine.reads.busy(within=5) == 0 and engine.reads.busy(within=31) == 1
        # Backing off after a failure: its retry reads the new version, the event adds no read.
        engine.upsert(credential("failing", {"secretArn": failing, "refreshInterval": "1h"}))
        await settle(engine)
        retries = engine.reads.busy(within=600)
        assert engine.rotated(moved(failing)) == rotation.DEFERRED
        assert engine.reads.busy(within=600) == retries
    finally:
        await engine.close()


async def test_a_version_another_replica_wrote_to_the_status_is_read_at_once() -> None:
    port = ScriptedPort()
    engine = Engine(settings(), port, FakeSink())
    engine.synced.set()
    a, pinned = secret("a"), secret("pinned")
    body = credential("a", {"secretArn": a, "refreshInterval": "1h"})
    try:
        engine.upsert(body)
        engine.upsert(credential("pinned", {"secretArn": pinned, "versionId": "v1", "refreshInterval": "1h"}))
        await settle(engine)
        reads = reads_of(port, "a-AbCdEf")
        # The status says what this replica holds (its own write coming back): nothing to read.
        engine.upsert({**body, "metadata": {**body["metadata"], "resourceVersion": "5"}, "status": {"versionId": "v1"}})
        await settle(engine)
        assert reads_of(port, "a-AbCdEf") == reads
        port.versions[a] = "v2"
        engine.upsert({**body, "metadata": {**body["metadata"], "resourceVersion": "6"}, "status": {"versionId": "v2"}})
        await until(lambda: engine.current("team-a", "a").version_id == "v2")
        assert reads_of(port, "a-AbCdEf") == reads + 1
        # A pinned version is what it is, whatever another replica's status says.
        pinned_body = credential("pinned", {"secretArn": pinned, "versionId": "v1", "refreshInterval": "1h"})
        pinned_body["metadata"]["resourceVersion"] = "7"
        pinned_body["status"] = {"versionId": "v9"}
        pinned_reads = reads_of(port, "pinned-AbCdEf")
        engine.upsert(pinned_body)
        await settle(engine)
        assert reads_of(port, "pinned-AbCdEf") == pinned_reads
    finally:
        await engine.close()


async def test_a_watch_ticket_resolves_at_the_next_change_only() -> None:
    port = ScriptedPort()
    engine = Engine(settings(), port, FakeSink())
    engine.synced.set()
    a = secret("a")
    try:
        engine.upsert(credential("a", {"secretArn": a, "refreshInterval": "1h"}))
        await settle(engine)
        ticket = engine.changes.ticket(("team-a", "a"))
        assert not await resolved(ticket, 0.05)  # nothing changed: a heartbeat's turn
        port.versions[a] = "v2"
        engine.rotated(moved(a))
        assert await resolved(ticket, 5)
        assert engine.current("team-a", "a").version_id == "v2"
        gone = engine.changes.ticket(("team-a", "a"))
        engine.remove("team-a", "a")
        assert await resolved(gone, 1)
        assert engine.current("team-a", "a").status == 404
        assert len(engine.changes) == 0
    finally:
        await engine.close()


async def test_an_event_before_anything_is_declared_is_undeclared_and_harmless() -> None:
    engine = Engine(settings(), ScriptedPort(), FakeSink())
    try:
        assert engine.rotated(moved(ARN)) == rotation.UNDECLARED
        await asyncio.sleep(0)
    finally:
        await engine.close()
