"""The status writer alone (no engine, no I/O): a sink that refuses Events, and how status writes
and Events are paced apart (#17, defect 6)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from connector_credentials.api.conditions import find_condition
from connector_credentials.core.entry import Entry, Outcome
from connector_credentials.core.status import StatusWriter
from tests.support.fakes import FakeSink

VERIFIED = Outcome(True, "AccessVerified", "Secret verified.")
DENIED = Outcome(False, "AccessDenied", "The role may not read the secret.")
NOT_FOUND = Outcome(False, "SecretNotFound", "No such secret.")


class ApiRefusal(Exception):
    """What the kube sink raises for a non-2xx answer: an HTTP ``status`` and its ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status, self.reason = status, reason


class EventsRefusedSink(FakeSink):
    """Accepts status writes; refuses every Event with 403 (no ``events/create``) while ``refusing``.

    ``attempts`` records the loop time of each Event post, refused or not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refusing = True
        self.attempts: list[float] = []

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None:
        self.attempts.append(asyncio.get_running_loop().time())
        if self.refusing:
            raise ApiRefusal(403, "Forbidden")
        await super().post_event(namespace, name, uid, warning=warning, reason=reason, message=message)


async def until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    """Wait for ``condition`` with a deadline (never a fixed sleep that decides the verdict)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.01)


def reason_written(sink: FakeSink) -> str | None:
    obj = sink.objects.get(("team-a", "slack"))
    ready = find_condition(obj["status"].get("conditions")) if obj else None
    return None if ready is None else str(ready["reason"])


def writer_for(sink: FakeSink, interval: float) -> tuple[StatusWriter, Entry]:
    entry = Entry(namespace="team-a", name="slack")
    entry.api.uid, entry.api.generation = "u1", 1
    writer = StatusWriter(sink, interval_of=lambda _: interval, forget=lambda _: None)
    return writer, entry


def report(writer: StatusWriter, entry: Entry, outcome: Outcome, interval: float) -> None:
    entry.schedule.outcome = outcome  # as the engine records it before reporting
    writer.report(entry, outcome, interval)


async def stop(writer: StatusWriter, entry: Entry) -> None:
    await writer.stop([entry])


async def test_a_refused_event_does_not_hold_back_the_next_status_write(caplog: pytest.LogCaptureFixture) -> None:
    # The refresh interval is 5 minutes: before the fix, the flush slept that long after the
    # refused Event before it wrote anything else, the next verdict's status included.
    sink = EventsRefusedSink()
    writer, entry = writer_for(sink, interval=300.0)
    caplog.set_level(logging.WARNING)
    try:
        report(writer, entry, VERIFIED, 300.0)
        await until(lambda: len(sink.attempts) == 1, 2, "the AccessVerified Event was never tried")
        assert reason_written(sink) == "AccessVerified"
        report(writer, entry, DENIED, 300.0)
        await until(lambda: reason_written(sink) == "AccessDenied", 2, "the next status waited for the Event")
        report(writer, entry, NOT_FOUND, 300.0)
        await until(lambda: reason_written(sink) == "SecretNotFound", 2, "the third status waited for the Event")
        # The refused Event waits for its own retry: not retried hot, nor by each status write.
        assert len(sink.attempts) == 1
        refusals = [r.getMessage() for r in caplog.records if "was refused" in r.getMessage()]
        assert len(refusals) == 1, refusals
        assert "Writing the Event of team-a/slack was refused (HTTP 403 Forbidden)" in refusals[0]
        # Each transition still has its Event queued, in order.
        assert [event[1] for event in entry.reporting.pending_events] == [
            "AccessVerified",
            "AccessDenied",
            "SecretNotFound",
        ]
    finally:
        await stop(writer, entry)


async def test_refused_events_are_retried_at_their_own_pace_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    interval = 0.2
    sink = EventsRefusedSink()
    writer, entry = writer_for(sink, interval=interval)
    caplog.set_level(logging.WARNING)
    try:
        report(writer, entry, VERIFIED, interval)
        await until(lambda: len(sink.attempts) >= 2, 5, "the refused Event was not retried")
        report(writer, entry, DENIED, interval)  # a status write between two retries of the Event
        await until(lambda: reason_written(sink) == "AccessDenied", 2, "the status was not written")
        await until(lambda: len(sink.attempts) >= 4, 5, "the refused Event was not retried after the status")
        gaps = [later - earlier for earlier, later in zip(sink.attempts, sink.attempts[1:], strict=False)]
        assert all(gap >= interval * 0.9 for gap in gaps), gaps  # at the refresh interval, never hot
        refusals = [r.getMessage() for r in caplog.records if "was refused" in r.getMessage()]
        assert len(refusals) == 1, refusals  # once, though retried and though a status write succeeded between
        sink.refusing = False
        await until(lambda: not entry.reporting.pending_events, 5, "the Events were never posted once allowed")
        assert [(warning, reason) for warning, reason, _ in sink.events] == [
            (False, "AccessVerified"),
            (True, "AccessDenied"),
        ]
        await asyncio.wait_for(writer.written(entry), 2)  # nothing left to write
        assert entry.reporting.event_pace is None  # its refusal forgotten with the Event's success
    finally:
        await stop(writer, entry)


class StatusRefusedSink(FakeSink):
    """Refuses every status write with 403 (no ``patch`` on the status subresource)."""

    def __init__(self) -> None:
        super().__init__()
        self.status_attempts = 0

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        self.status_attempts += 1
        raise ApiRefusal(403, "Forbidden")


async def test_an_event_still_waits_for_the_status_write_before_it() -> None:
    # Posting an Event before its status is written would defeat the replicas' stand-down: the
    # replica that loses the race to write learns it from the 409 and drops its Event.
    sink = StatusRefusedSink()
    writer, entry = writer_for(sink, interval=300.0)
    try:
        report(writer, entry, VERIFIED, 300.0)
        await until(lambda: sink.status_attempts == 1, 2, "the status write was never tried")
        # The fake sink never suspends: had the flush gone on to the Event after the refusal, it
        # would have posted it in the same step, before this test saw the attempt.
        assert sink.events == []
        assert [event[1] for event in entry.reporting.pending_events] == ["AccessVerified"]
    finally:
        await stop(writer, entry)


class GatedSink(FakeSink):
    """Holds each status write at ``gate`` (FakeSink's), telling the test when one is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.in_flight = False

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        self.in_flight = True
        try:
            return await super().patch_status(namespace, name, status, resource_version)
        finally:
            self.in_flight = False


async def test_the_event_of_an_accepted_write_is_posted_though_the_watch_showed_the_write_first() -> None:
    # Seen against the real API server: the watch delivered our own status write before the
    # write's answer came; observed() took it for another replica's and dropped the Event.
    sink = GatedSink()
    writer, entry = writer_for(sink, interval=300.0)
    try:
        report(writer, entry, VERIFIED, 300.0)
        await until(lambda: sink.in_flight, 2, "the status write never started")
        # The watch shows the status our write is about to be answered for.
        entry.api.live_status = {"conditions": [{"type": "Ready", "status": "True", "reason": "AccessVerified"}]}
        writer.observed(entry)
        sink.gate.set()
        await until(lambda: bool(sink.events), 2, "the Event of the accepted write was never posted")
        assert [event[1] for event in sink.events] == ["AccessVerified"]
    finally:
        await stop(writer, entry)
