"""The status writer's queue (#17, memory at scale): credentials wait for a write as items in a queue
or a retry heap, not as a task each, and a few workers write for all of them. What it must keep:
coalescing, removal, the drain, and nothing left running after it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from connector_credentials.core.entry import Entry, Outcome
from connector_credentials.core.status import StatusWriter
from connector_credentials.core.status_queue import WORKERS, Lane, Turn
from tests.support.fakes import FakeSink

VERIFIED = Outcome(True, "AccessVerified", "Secret verified.")
DENIED = Outcome(False, "AccessDenied", "The role may not read the secret.")
#: The workers of both lanes: all the tasks the writer may have, however many credentials wait.
ALL_WORKERS = sum(WORKERS.values())


class SlowSink(FakeSink):
    """An API server that answers nothing until ``gate`` is set (or fails every status write while
    ``failing``), and counts the writes it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = 0
        self.failing = False

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        if self.failing:
            raise ConnectionError("api down")
        self.held += 1
        try:
            return await super().patch_status(namespace, name, status, resource_version)
        finally:
            self.held -= 1


def credentials(n: int) -> list[Entry]:
    entries = []
    for i in range(n):
        entry = Entry(namespace="team-a", name=f"c{i:04d}")
        entry.api.uid, entry.api.generation = f"u{i}", 1
        entries.append(entry)
    return entries


def report(writer: StatusWriter, entry: Entry, outcome: Outcome) -> None:
    entry.schedule.outcome = outcome  # as the engine records it before reporting
    writer.report(entry, outcome, 300.0)


async def until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.01)


def tasks_beyond(baseline: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task not in baseline and not task.done()]


async def test_a_thousand_credentials_waiting_for_a_slow_api_server_take_a_few_tasks() -> None:
    # Before, each credential with a write waiting had a task of its own: 1,000 here (about
    # 2.4 KiB each; 7,000 at once at 10,000 credentials after a first pass).
    baseline = asyncio.all_tasks()
    sink = SlowSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    entries = credentials(1000)
    try:
        for entry in entries:
            report(writer, entry, VERIFIED)
        await until(lambda: sink.held == WORKERS[Lane.STATUS], 2, "the status writers did not start")
        assert len(tasks_beyond(baseline)) <= ALL_WORKERS
        assert all(entry.reporting.writing for entry in entries)
        sink.gate.set()
        await asyncio.wait_for(asyncio.gather(*(writer.written(entry) for entry in entries)), 20)
        assert len(sink.patches) == 1000
        assert len(sink.events) == 1000  # one transition each, posted after its status
        assert len(tasks_beyond(baseline)) <= ALL_WORKERS
    finally:
        await writer.stop(entries)
    assert tasks_beyond(baseline) == [], "a task outlived the writer's stop"


async def test_credentials_waiting_for_their_retry_take_no_task_each() -> None:
    baseline = asyncio.all_tasks()
    sink = SlowSink()
    sink.failing = True
    sink.gate.set()  # failing fast, not slow
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    entries = credentials(1000)
    try:
        for entry in entries:
            report(writer, entry, VERIFIED)
        await until(
            lambda: all(entry.reporting.turn is Turn.RETRY for entry in entries), 5, "the writes were not all retrying"
        )
        assert len(tasks_beyond(baseline)) <= ALL_WORKERS
        pace = entries[0].reporting.status_pace
        assert pace is not None and pace.failures == 1  # retried in 0.5 s, by the one timer
        sink.failing = False
        await asyncio.wait_for(asyncio.gather(*(writer.written(entry) for entry in entries)), 20)
        assert {patch["conditions"][0]["reason"] for patch in sink.patches} == {"AccessVerified"}
        assert all(entry.reporting.status_pace is None for entry in entries)
    finally:
        await writer.stop(entries)
    assert tasks_beyond(baseline) == []


async def test_reports_while_a_credential_waits_for_its_turn_are_one_write_of_the_latest() -> None:
    sink = SlowSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    ahead, (last,) = credentials(WORKERS[Lane.STATUS]), [Entry(namespace="team-a", name="late")]
    try:
        for entry in ahead:
            report(writer, entry, VERIFIED)
        await until(lambda: sink.held == len(ahead), 2, "the status writers did not start")
        for outcome in (VERIFIED, DENIED, VERIFIED, DENIED):
            report(writer, last, outcome)  # waits behind the writes in flight
        assert last.reporting.turn is Turn.QUEUED
        sink.gate.set()
        await asyncio.wait_for(writer.written(last), 5)
        written = [patch for patch in sink.patches if patch["conditions"][0]["message"] == DENIED.message]
        assert len(written) == 1  # the latest verdict, once
        assert [reason for _, reason, _ in sink.events].count("AccessDenied") == 2  # each transition has its Event
    finally:
        await writer.stop([*ahead, last])


async def test_a_credential_dropped_while_it_waits_is_never_written() -> None:
    sink = SlowSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    ahead, (gone,) = credentials(WORKERS[Lane.STATUS]), [Entry(namespace="team-a", name="gone")]
    try:
        for entry in ahead:
            report(writer, entry, VERIFIED)
        await until(lambda: sink.held == len(ahead), 2, "the status writers did not start")
        report(writer, gone, VERIFIED)
        waiting = writer.written(gone)
        writer.drop(gone)  # as Engine.remove does
        assert waiting.done()  # whoever waited is told: nothing more is written for it
        sink.gate.set()
        await asyncio.wait_for(asyncio.gather(*(writer.written(entry) for entry in ahead)), 5)
        await asyncio.sleep(0.05)
        assert ("team-a", "gone") not in sink.objects
        assert gone.reporting.turn is Turn.DROPPED and not gone.reporting.writing
    finally:
        await writer.stop([*ahead, gone])


async def test_the_stop_cancels_the_writes_in_flight_and_tells_whoever_waits() -> None:
    baseline = asyncio.all_tasks()
    sink = SlowSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    entries = credentials(50)
    for entry in entries:
        report(writer, entry, VERIFIED)
    await until(lambda: sink.held == WORKERS[Lane.STATUS], 2, "the status writers did not start")
    waiting = [writer.written(entry) for entry in entries]
    await writer.stop(entries)
    assert sink.held == 0  # the requests in flight were cancelled with their workers
    assert all(future.done() for future in waiting)
    assert tasks_beyond(baseline) == []
    report(writer, entries[0], DENIED)  # after the drain: nothing is written, nothing starts
    await asyncio.sleep(0.05)
    assert sink.patches == [] and tasks_beyond(baseline) == []


async def test_an_idle_credential_shares_one_finished_future() -> None:
    sink = FakeSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    first, second = credentials(2)
    try:
        assert writer.written(first) is writer.written(second)
        assert writer.written(first).done()
        assert first.reporting.waiter is None  # nothing made for a credential with nothing to write
        report(writer, first, VERIFIED)
        await asyncio.wait_for(writer.written(first), 2)
        assert first.reporting.waiter is None  # let go once told
    finally:
        await writer.stop([first, second])


class EventsHeldSink(FakeSink):
    """Accepts status writes at once; holds every Event until ``events_gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.events_gate = asyncio.Event()
        self.held = 0

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None:
        self.held += 1
        try:
            await self.events_gate.wait()
            await super().post_event(namespace, name, uid, warning=warning, reason=reason, message=message)
        finally:
            self.held -= 1


async def test_an_event_waiting_for_a_sender_is_not_dropped_by_a_check_of_the_same_verdict() -> None:
    # The flush task posted a transition's Event as soon as its status write was accepted; in the
    # queue it may wait for a sender (at start, behind thousands). The next check finds the API
    # saying that verdict (our write) and drops the transitions queued that never became visible:
    # not this one, which did.
    sink = EventsHeldSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    ahead, (late,) = credentials(WORKERS[Lane.EVENT]), [Entry(namespace="team-a", name="late")]
    try:
        for entry in ahead:
            report(writer, entry, VERIFIED)
        await until(lambda: sink.held == len(ahead), 2, "the Event senders did not start")
        report(writer, late, VERIFIED)
        await until(lambda: reason_of(sink, late) == "AccessVerified", 2, "the status was not written")
        report(writer, late, VERIFIED)  # the next check: the API says AccessVerified, by our write
        sink.events_gate.set()
        await asyncio.wait_for(writer.written(late), 5)
        assert [reason for _, reason, _ in sink.events].count("AccessVerified") == len(ahead) + 1
    finally:
        await writer.stop([*ahead, late])


def reason_of(sink: FakeSink, entry: Entry) -> str | None:
    obj = sink.objects.get(entry.key)
    conditions = obj["status"].get("conditions") if obj else None
    return str(conditions[0]["reason"]) if conditions else None


async def test_the_stop_lets_what_is_decided_be_written_within_its_bound() -> None:
    # SIGTERM just after a verdict: its status is written and its Event waits for a sender. The
    # stop at shutdown gives it a little time, so that `kubectl describe` shows the transition.
    baseline = asyncio.all_tasks()
    sink = EventsHeldSink()
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    (entry,) = credentials(1)
    report(writer, entry, VERIFIED)
    await until(lambda: sink.held == 1, 2, "the Event sender did not start")
    asyncio.get_running_loop().call_later(0.2, sink.events_gate.set)  # the API answers a moment later
    await writer.stop([entry], within=5.0)
    assert [reason for _, reason, _ in sink.events] == ["AccessVerified"]
    assert tasks_beyond(baseline) == []


async def test_the_stop_does_not_wait_beyond_its_bound_for_an_api_that_never_answers() -> None:
    baseline = asyncio.all_tasks()
    sink = EventsHeldSink()  # the gate is never opened
    writer = StatusWriter(sink, interval_of=lambda _: 300.0, forget=lambda _: None)
    (entry,) = credentials(1)
    report(writer, entry, VERIFIED)
    await until(lambda: sink.held == 1, 2, "the Event sender did not start")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await writer.stop([entry], within=0.3)
    assert 0.3 <= loop.time() - started < 2.0
    assert sink.events == [] and sink.held == 0 and tasks_beyond(baseline) == []
