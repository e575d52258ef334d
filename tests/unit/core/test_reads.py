"""Reads: the one owner of reads (plans, the sweep, sharing, hurrying, the fallback per lane), with a scripted port."""

import asyncio
import logging
import math
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.reads import BATCH_RETRY_AFTER, Done, ReadKey, Reads
from connector_credentials.core.timing import Plan
from tests.support.fakes import ScriptedPort

ONE = AssumedRole("arn:aws:iam::111122223333:role/a")
TWO = AssumedRole("arn:aws:iam::111122223333:role/b")


def arn(name: str, region: str = "us-east-1") -> SecretArn:
    text = f"arn:aws:secretsmanager:{region}:123456789012:secret:{name}-AbCdEf"
    return SecretArn(arn=text, partition="aws", region=region, account="123456789012", name=f"{name}-AbCdEf")


def key(name: str, *, version: str | None = None, stage: str | None = "AWSCURRENT", role: Any = None) -> ReadKey:
    return ReadKey(arn(name), version, stage, role)


class Harness:
    """A reader whose deliveries are recorded, and helpers to plan and wait."""

    def __init__(self, port: ScriptedPort, **options: Any) -> None:
        self.port = port
        self.delivered: dict[ReadKey, list[Done]] = {}
        self.arrived = asyncio.Event()
        self.reads = Reads(port, deliver=self._deliver, max_workers=options.pop("max_workers", 4), **options)

    def _deliver(self, read: ReadKey, done: Done) -> None:
        self.delivered.setdefault(read, []).append(done)
        self.arrived.set()

    def plan_now(self, keys: list[ReadKey], *, window: float = 0.05) -> None:
        now = asyncio.get_running_loop().time()
        for read in keys:
            self.reads.plan(read, Plan(due=now + window, earliest=now))

    async def until_delivered(self, keys: list[ReadKey], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(read in self.delivered for read in keys):
                self.arrived.clear()
                await self.arrived.wait()

    def calls(self) -> int:
        return len(self.port.batches) + len(self.port.singles)


@pytest.fixture
async def harness() -> Any:
    port = ScriptedPort()
    h = Harness(port)
    yield h
    port.gate.set()
    h.reads.close()


async def test_plans_due_together_leave_in_batches_of_twenty(harness: Harness) -> None:
    keys = [key(f"s{i}") for i in range(45)]
    harness.plan_now(keys)
    await harness.until_delivered(keys)
    assert [harness.delivered[k][0].fetched.raw for k in keys] == [f"s{i}-AbCdEf" for i in range(45)]  # type: ignore[union-attr]
    assert sorted(len(batch) for batch in harness.port.batches) == [5, 20, 20]
    assert harness.port.singles == []


async def test_a_steady_cycle_costs_one_call_per_twenty_secrets(harness: Harness) -> None:
    """The sweep takes what may leave within each plan's jitter range: spread-out due times still
    fill batches of twenty (independent jitter alone would leave them half empty)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    keys = [key(f"c{i}") for i in range(100)]
    for i, read in enumerate(keys):  # due over 0.4 s, each free to leave from the start of that range
        harness.reads.plan(read, Plan(due=now + 0.3 + 0.004 * i, earliest=now + 0.25))
    await harness.until_delivered(keys)
    assert len(harness.port.batches) == math.ceil(100 / 20) and harness.port.singles == []


async def test_a_plan_never_leaves_before_its_earliest_time(harness: Harness) -> None:
    loop = asyncio.get_running_loop()
    now = loop.time()
    harness.reads.plan(key("early"), Plan(due=now + 0.05, earliest=now))
    harness.reads.plan(key("later"), Plan(due=now + 0.6, earliest=now + 0.5))
    await harness.until_delivered([key("early")])
    assert key("later") not in harness.delivered and harness.port.batches == [["early-AbCdEf"]]
    await harness.until_delivered([key("later")])
    assert loop.time() - now >= 0.5


async def test_reads_as_different_roles_never_share_a_batch_or_a_read(harness: Harness) -> None:
    keys = [key("shared"), key("shared", role=ONE), key("shared", role=TWO), key("other", role=ONE)]
    harness.plan_now(keys)
    harness.plan_now([key("shared", role=ONE)])  # wanted twice: read once
    await harness.until_delivered(keys)
    by_role = {
        repr(role): sorted(names) for role, names in zip(harness.port.batch_roles, harness.port.batches, strict=True)
    }
    assert by_role == {
        repr(None): ["shared-AbCdEf"],
        repr(ONE): ["other-AbCdEf", "shared-AbCdEf"],
        repr(TWO): ["shared-AbCdEf"],
    }
    assert all(len(dones) == 1 for dones in harness.delivered.values())


async def test_pinned_versions_and_stages_are_single_reads(harness: Harness) -> None:
    keys = [key("same"), key("same", stage="AWSPREVIOUS"), key("same", version="v7", stage=None)]
    harness.plan_now(keys)
    await harness.until_delivered(keys)
    assert harness.port.batches == [["same-AbCdEf"]]
    assert sorted(harness.port.singles, key=repr) == sorted(
        [("same-AbCdEf", None, "AWSPREVIOUS"), ("same-AbCdEf", "v7", None)], key=repr
    )


async def test_a_failure_in_a_batch_is_that_secrets_own(harness: Harness) -> None:
    denied = key("denied")
    harness.port.failing[denied.arn.arn] = AwsFailure(Reason.ACCESS_DENIED, "no")
    harness.plan_now([key("fine"), denied])
    await harness.until_delivered([key("fine"), denied])
    assert harness.delivered[key("fine")][0].fetched is not None
    failure = harness.delivered[denied][0].failure
    assert failure is not None and failure.reason == Reason.ACCESS_DENIED


async def test_a_secret_a_batch_answer_leaves_out_is_read_alone(harness: Harness) -> None:
    odd = key("odd")
    harness.port.silent.add(odd.arn.arn)
    harness.plan_now([odd])
    await harness.until_delivered([odd])
    assert harness.delivered[odd][0].fetched.raw == "odd-AbCdEf"  # type: ignore[union-attr]
    assert harness.port.batches == [["odd-AbCdEf"]] and harness.port.singles == [("odd-AbCdEf", None, "AWSCURRENT")]


async def test_a_refused_batch_falls_back_for_that_role_only_and_says_so_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 2: one role refused BatchGetSecretValue turned batching off for every identity."""
    loop = asyncio.get_running_loop()
    shift = [0.0]
    harness.reads._clock = lambda: loop.time() + shift[0]
    harness.port.refused_roles = {ONE}
    caplog.set_level(logging.WARNING, logger="connector_credentials.core.reads")
    refused = [key(f"a{i}", role=ONE) for i in range(20)]
    harness.plan_now(refused)
    await harness.until_delivered(refused)
    more = [key(f"b{i}", role=ONE) for i in range(5)]
    mine = [key(f"m{i}") for i in range(20)]
    harness.plan_now(more + mine)
    await harness.until_delivered(more + mine)
    roles = harness.port.batch_roles
    assert roles.count(ONE) == 1  # refused once; from then on, one secret per call as that role
    assert roles.count(None) == 1  # the operator's own identity still reads twenty per call
    assert len(harness.port.singles) == 25
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "BatchGetSecretValue" in warnings[0] and ONE.arn in warnings[0] and "docs/install-eks.md" in warnings[0]
    shift[0] += BATCH_RETRY_AFTER + 1  # an hour later the batch is tried again (the policy may have changed)
    harness.port.refused_roles = set()
    harness.plan_now([key("c", role=ONE)])
    await harness.until_delivered([key("c", role=ONE)])
    assert roles.count(ONE) == 2


async def test_a_hurried_read_overtakes_a_busy_queue_on_the_priority_lane(harness: Harness) -> None:
    harness.port.gate.clear()  # background batches (only secrets q...) hang until released
    harness.port.holds = lambda names: all(name.startswith("q") for name in names)
    queued = [key(f"q{i}") for i in range(200)]
    harness.plan_now(queued, window=0)
    await asyncio.sleep(0.1)
    assert harness.port.most_running == 4  # bounded: the other six batches wait here, not in a thread queue
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(harness.reads.hurry(key("urgent")), 2)
    assert harness.delivered[key("urgent")][0].fetched is not None and loop.time() - began < 1
    harness.port.gate.set()
    await harness.until_delivered(queued)
    assert harness.port.most_running <= 4 + 2  # the batch slots, plus the priority lane's two threads


async def test_a_refresh_does_not_join_a_read_that_started_before_it_asked(harness: Harness) -> None:
    harness.port.gate.clear()
    slow = key("slow")
    harness.plan_now([slow], window=0)
    await asyncio.sleep(0.05)
    asked = asyncio.get_running_loop().time()
    later = asyncio.ensure_future(harness.reads.hurry(slow, not_before=asked))
    await asyncio.sleep(0.05)
    harness.port.gate.set()
    await later
    async with asyncio.timeout(5):  # the first read may land after the second: both are delivered
        while len(harness.delivered.get(slow, [])) < 2:
            harness.arrived.clear()
            await harness.arrived.wait()
    assert harness.calls() == 2


async def test_a_stampede_of_hurried_reads_rides_in_batches() -> None:
    """Defect 3: reads someone waits on left their batch for the 2-thread lane as single calls.

    1,000 credentials whose first checks are queued, and a controller that asks for all of them at
    once: every read is answered, in about ceil(N/20) calls, with no single reads."""
    port = ScriptedPort()
    port.latency = 0.02
    h = Harness(port, max_workers=8)
    try:
        keys = [key(f"k{i}") for i in range(1000)]
        h.plan_now(keys, window=0.05)
        await asyncio.wait_for(asyncio.gather(*(h.reads.hurry(k) for k in keys)), 20)
        assert all(k in h.delivered for k in keys)
        assert port.singles == []
        assert len(port.batches) <= math.ceil(1000 / 20) + 10
    finally:
        h.reads.close()


async def test_forgetting_a_key_drops_its_plan_and_releases_its_waiters(harness: Harness) -> None:
    harness.port.gate.clear()
    harness.port.holds = lambda names: "busy-AbCdEf" in names
    harness.plan_now([key("busy")], window=0)
    await asyncio.sleep(0.05)
    gone = key("gone")
    now = asyncio.get_running_loop().time()
    harness.reads.plan(gone, Plan(due=now + 0.2, earliest=now + 0.1))
    harness.reads.forget(gone)
    harness.port.gate.set()
    await harness.until_delivered([key("busy")])
    await asyncio.sleep(0.3)
    assert gone not in harness.delivered and not harness.reads.busy(within=1)


async def test_paused_the_reader_lets_waiters_go_and_starts_nothing(harness: Harness) -> None:
    harness.port.gate.clear()
    waiting = asyncio.ensure_future(harness.reads.hurry(key("held")))
    await asyncio.sleep(0.05)
    harness.reads.pause()
    await asyncio.wait_for(waiting, 1)  # answered at once, not when AWS answers
    harness.plan_now([key("after")], window=0)
    await asyncio.sleep(0.1)
    harness.port.gate.set()
    await asyncio.sleep(0.1)
    assert harness.delivered == {} and all("after-AbCdEf" not in b for b in harness.port.batches)
