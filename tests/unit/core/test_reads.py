"""SecretReader (batching, sharing, the priority lane, the fallback) and Cohorts, with a scripted port."""

import asyncio
import logging
import math
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.reads import BATCH_RETRY_AFTER, SecretReader
from connector_credentials.core.timing import Cohorts
from tests.support.fakes import ScriptedPort

IDENTITY = ScriptedPort.identity


def arn(name: str, region: str = "us-east-1") -> SecretArn:
    text = f"arn:aws:secretsmanager:{region}:123456789012:secret:{name}-AbCdEf"
    return SecretArn(arn=text, partition="aws", region=region, account="123456789012", name=f"{name}-AbCdEf")


@pytest.fixture
async def reader_and_port() -> Any:
    port = ScriptedPort()
    reader = SecretReader(port, max_workers=4)
    yield reader, port
    port.gate.set()
    reader.close()


async def test_reads_of_current_versions_leave_in_batches_of_twenty(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    loop = asyncio.get_running_loop()
    began = loop.time()
    answers = await asyncio.gather(*(reader.read(arn(f"s{i}"), None, "AWSCURRENT", window=0.2) for i in range(45)))
    assert [fetched.raw for _, fetched in answers] == [f"s{i}-AbCdEf" for i in range(45)]
    assert sorted(len(batch) for batch in port.batches) == [5, 20, 20]
    assert port.singles == []
    # The two full batches left at once; the last five waited for their window, and no longer.
    assert 0.15 <= loop.time() - began < 2
    assert (reader.counts.batch, reader.counts.batched_secrets, reader.counts.single) == (3, 45, 0)


async def test_reads_as_different_roles_never_share_a_batch_or_a_read(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    one, two = AssumedRole("arn:aws:iam::111122223333:role/a"), AssumedRole("arn:aws:iam::111122223333:role/b")
    same = arn("shared")
    answers = await asyncio.gather(
        reader.read(same, None, "AWSCURRENT", window=0.05),
        reader.read(same, None, "AWSCURRENT", window=0.05, role=one),
        reader.read(same, None, "AWSCURRENT", window=0.05, role=two),
        reader.read(arn("other"), None, "AWSCURRENT", window=0.05, role=one),
        reader.read(same, None, "AWSCURRENT", window=0.05, role=one),
    )
    batches = sorted(zip(port.batch_roles, port.batches, strict=True), key=repr)
    assert sorted(map(repr, port.batch_roles)) == sorted(map(repr, [None, one, two]))
    by_role = {repr(role): sorted(names) for role, names in batches}
    assert by_role[repr(one)] == ["other-AbCdEf", "shared-AbCdEf"]
    assert answers[1] is answers[4] and answers[0] is not answers[1]


async def test_one_read_per_secret_and_selector_is_shared(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    same = arn("shared")
    answers = await asyncio.gather(
        reader.read(same, None, "AWSCURRENT", window=0.05),
        reader.read(same, None, "AWSCURRENT", window=0.05),
        reader.read(same, None, "AWSPREVIOUS", window=0.05),
        reader.read(same, "v7", None, window=0.05),
    )
    assert port.batches == [["shared-AbCdEf"]]  # the two current reads: one secret in one batch
    # Other stages and pinned versions are single GetSecretValue calls, each with its selector.
    assert sorted(port.singles, key=str) == sorted(
        [("shared-AbCdEf", None, "AWSPREVIOUS"), ("shared-AbCdEf", "v7", None)], key=str
    )
    assert answers[0] is answers[1]


async def test_a_failure_in_a_batch_is_that_secrets_alone(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    denied = arn("denied")
    port.failing[denied.arn] = AwsFailure(Reason.ACCESS_DENIED, "denied")
    ok, failed = await asyncio.gather(
        reader.read(arn("fine"), None, None, window=0.01),
        reader.read(denied, None, None, window=0.01),
        return_exceptions=True,
    )
    assert not isinstance(ok, BaseException) and ok[1].raw == "fine-AbCdEf"
    assert isinstance(failed, AwsFailure) and failed.reason == Reason.ACCESS_DENIED
    assert len(port.batches) == 1 and port.singles == []


async def test_a_secret_the_batch_answer_does_not_mention_is_read_alone(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    odd = arn("odd")
    port.silent.add(odd.arn)
    _, fetched = await reader.read(odd, None, None, window=0.01)
    assert fetched.raw == "odd-AbCdEf"
    assert port.batches == [["odd-AbCdEf"]] and port.singles == [("odd-AbCdEf", None, None)]


async def test_a_refused_batch_falls_back_to_single_reads_and_says_so_once(
    reader_and_port: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reader, port = reader_and_port
    now = [1000.0]
    reader._clock = lambda: now[0]
    port.refuse_batches = True
    caplog.set_level(logging.WARNING, logger="connector_credentials.core.reads")
    first = await asyncio.gather(*(reader.read(arn(f"a{i}"), None, None, window=0.2) for i in range(20)))
    second = await asyncio.gather(*(reader.read(arn(f"b{i}"), None, None, window=0) for i in range(5)))
    assert len(first) == 20 and len(second) == 5
    assert len(port.batches) == 1  # refused once; from then on, one secret per call
    assert len(port.singles) == 25
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "BatchGetSecretValue" in warnings[0] and "docs/install-eks.md" in warnings[0]
    now[0] += BATCH_RETRY_AFTER + 1  # an hour later the batch is tried again (the policy may have changed)
    port.refuse_batches = False
    await reader.read(arn("c"), None, None, window=0)
    assert len(port.batches) == 2


async def test_a_read_someone_waits_for_overtakes_a_busy_queue(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    port.gate.clear()  # every batch call hangs until released
    queued = [asyncio.ensure_future(reader.read(arn(f"q{i}"), None, None, window=0)) for i in range(200)]
    await asyncio.sleep(0.1)
    assert port.most_running == 4  # bounded: the other 120 reads wait here, not in a thread queue
    loop = asyncio.get_running_loop()
    began = loop.time()
    _, fetched = await reader.read_now(arn("urgent"), None, None)
    assert fetched.raw == "urgent-AbCdEf" and loop.time() - began < 1
    # A queued read that someone now waits for leaves the queue for the priority lane.
    reader.expedite(arn("q199"), None, None)
    _, fetched = await asyncio.wait_for(asyncio.shield(queued[199]), 5)
    assert fetched.raw == "q199-AbCdEf"
    port.gate.set()
    await asyncio.gather(*queued)
    assert port.most_running <= 4 + 2  # the batch slots, plus the priority lane's two threads


async def test_a_refresh_does_not_join_a_read_that_started_before_it_asked(reader_and_port: Any) -> None:
    reader, port = reader_and_port
    port.gate.clear()
    key = arn("slow")
    early = asyncio.ensure_future(reader.read(key, None, None, window=0))
    await asyncio.sleep(0.05)
    asked = asyncio.get_running_loop().time()
    later = asyncio.ensure_future(reader.read_now(key, None, None, not_before=asked))
    await asyncio.sleep(0.05)
    port.gate.set()
    await asyncio.gather(early, later)
    assert len(port.batches) + len(port.singles) == 2


def test_cohorts_group_twenty_secrets_per_due_time() -> None:
    cohorts = Cohorts()
    dues = [
        cohorts.place(
            "us-east-1",
            (f"s{i}", None, "AWSCURRENT"),
            now=0,
            earliest=27,
            latest=33,
            preferred=27 + (i * 37 % 1000) * 0.006,
        )
        for i in range(1000)
    ]
    assert all(27 <= due <= 33 for due in dues)
    assert len(set(dues)) == math.ceil(1000 / 20) == len(cohorts)
    # Another credential that reads the same secret, due in a range that holds that cohort, shares it.
    again = cohorts.place("us-east-1", ("s5", None, "AWSCURRENT"), now=1, earliest=20, latest=40, preferred=39)
    assert again == dues[5]
    # Outside every existing cohort's range: a new cohort at the preferred time.
    assert cohorts.place("us-east-1", ("x", None, None), now=1, earliest=50, latest=55, preferred=52) == 52
    # Other regions never share (a batch is one region's).
    assert cohorts.place("eu-west-1", ("y", None, None), now=1, earliest=27, latest=33, preferred=30) == 30
    # Cohorts whose time has passed are dropped.
    cohorts.place("us-east-1", ("z", None, None), now=34, earliest=60, latest=66, preferred=63)
    assert len(cohorts) == 3
