"""The status writer: what each credential's status should say, and getting it written.

It computes the desired status from a verdict, queues one Event per transition, and writes
both through a :class:`StatusSink` until the API accepts them: conflicts (409) are settled by
re-reading the object, transient API failures are retried with backoff, and answers that a
retry cannot fix (403, 404 on Events, 422) are logged once and retried at the refresh interval.
Status writes and Events are retried at their own pace: a refused Event never delays a status write.
When and by which worker each attempt is made is :mod:`connector_credentials.core.status_queue`'s:
no task per credential.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from connector_credentials.api.conditions import (
    EVENT_ROTATED,
    find_condition,
    now_rfc3339,
    same_condition,
    set_condition,
)
from connector_credentials.core.status_queue import Lane, StatusQueue, Turn
from connector_credentials.core.supervise import RESTART_BASE, RESTART_CAP, log_bug
from connector_credentials.core.timing import capped_doubling

if TYPE_CHECKING:
    from connector_credentials.core.entry import Entry, Outcome

logger = logging.getLogger("connector_credentials.core.engine")

#: An Event to post: (warning, reason, message).
PendingEvent = tuple[bool, str, str]

#: The first retry of a failed write, doubling up to the cap.
RETRY_BASE = 0.5
RETRY_CAP = 30.0


class StatusConflict(Exception):
    """The object changed since the resourceVersion a status write was based on (HTTP 409)."""


class StatusSink(Protocol):
    """Where status and events go (the Kubernetes API in production)."""

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource, on the condition that the object is still at
        ``resource_version`` (raise :class:`StatusConflict` if not); return the new object,
        ``None`` if it is gone."""
        ...

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the API has it now, ``None`` if it is gone."""
        ...

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None: ...


#: At shutdown, once the socket has closed, how long what is already decided may still take to be
#: written: a transition's Event queued just before SIGTERM is otherwise lost from `kubectl
#: describe`. Bounded, so that an API outage does not hold the exit back.
FINAL_WRITES = 2.0


@dataclass(slots=True)
class Pace:
    """Writes of one kind (status or Event) that failed: when the next may be tried, how many failed
    in a row, and the HTTP status of the last refusal logged (logged once, not every retry)."""

    due: float = 0.0
    failures: int = 0
    refused: int | None = None


@dataclass(slots=True)
class Reporting:
    """The writer's state for one credential: what is still to write, and where it is in the queue.

    No task and no event: a credential waiting for its turn or its retry is an item in a queue or a
    heap (core/status_queue.py), which is what lets 10,000 of them wait in little memory.
    """

    #: The newest status patch not yet accepted (``None``: nothing to write).
    pending_status: dict[str, Any] | None = None
    #: Events not yet posted, oldest first. A tuple, replaced on each change: the empty one is
    #: shared, where an empty list was 72 bytes for every credential.
    pending_events: tuple[PendingEvent, ...] = ()
    #: The last verdict (reason, ready) an Event was queued for (one tuple per verdict, shared).
    reported: tuple[str, bool] | None = None
    #: The first Event is due and as good as sent (its status write was accepted): a report of the
    #: verdict the API now shows does not drop it while it waits for a sender.
    posting: bool = False
    #: Status writes and Events are paced apart (``None``: the last one was accepted), so that a
    #: refused Event never holds a status write back (#17, defect 6).
    status_pace: Pace | None = None
    event_pace: Pace | None = None
    #: Where it is in the queue, and the due time of its retry while it waits for one.
    turn: Turn = Turn.IDLE
    retry_at: float = 0.0
    #: Made only for someone waiting until nothing is left to write (StatusWriter.written).
    waiter: asyncio.Future[None] | None = None

    @property
    def writing(self) -> bool:
        """Whether something is queued, in flight or waiting for a retry."""
        return self.turn is not Turn.IDLE and self.turn is not Turn.DROPPED


class StatusWriter:
    """Desired status, flush, conflicts and Events, for every credential of one engine."""

    def __init__(
        self,
        sink: StatusSink,
        *,
        interval_of: Callable[[Entry], float],
        forget: Callable[[Entry], None],
        heartbeat: float = 600.0,
        on_write: Callable[[str], None] | None = None,
    ) -> None:
        self._sink = sink
        #: Told how each status write ended: ok, conflict, gone or failed (the metrics).
        self._on_write = on_write or _ignore
        self._interval_of = interval_of
        self._forget = forget
        self._heartbeat = heartbeat
        self._queue = StatusQueue(self._wanted, self._attempt)
        #: The verdicts (reason, ready) reported, one tuple each, shared by every credential (a few
        #: reasons, ready or not), where each kept its own (72 bytes).
        self._verdicts: dict[tuple[str, bool], tuple[str, bool]] = {}

    # --- what the status should say -------------------------------------------------------

    def desired_status(self, entry: Entry, outcome: Outcome, interval: float) -> dict[str, Any] | None:
        """The status patch to write, or ``None`` when the live status already says it."""
        live = entry.api.live_status
        now = now_rfc3339()
        conditions = set_condition(
            live.get("conditions"),
            status=outcome.ready,
            reason=outcome.reason,
            message=outcome.message,
            observed_generation=entry.api.generation,
            now=now,
        )
        new_ready = find_condition(conditions)
        patch: dict[str, Any] = {}
        if not same_condition(find_condition(live.get("conditions")), new_ready):
            patch["conditions"] = conditions
        if entry.api.generation is not None and live.get("observedGeneration") != entry.api.generation:
            patch["observedGeneration"] = entry.api.generation
        held = entry.held
        if outcome.ready and held.version_id and live.get("versionId") != held.version_id:
            patch["versionId"] = held.version_id
        live_identity = live.get("identityArn")
        if held.identity and (
            not isinstance(live_identity, str) or stable_identity(live_identity) != stable_identity(held.identity)
        ):
            # Compared without the STS session name, which differs per replica and per refresh.
            patch["identityArn"] = held.identity
        if held.credential_source and live.get("credentialSource") != held.credential_source:
            patch["credentialSource"] = held.credential_source
        if patch or _older_than(live.get("lastCheckedTime"), self._heartbeat):
            # A check that changes nothing writes nothing but this heartbeat (CCRED_STATUS_HEARTBEAT):
            # status writes per cycle stay at the changed credentials, whatever N and the replicas.
            patch["lastCheckedTime"] = now
        return patch or None

    def report(self, entry: Entry, outcome: Outcome, interval: float) -> None:
        """A check reached ``outcome``: queue its status (and its Event if it is a transition)."""
        state = entry.reporting
        patch = self.desired_status(entry, outcome, interval)
        old = find_condition(entry.api.live_status.get("conditions"))
        verdict = (str(outcome.reason), outcome.ready)
        live_verdict = None if old is None else (old.get("reason"), old.get("status") == "True")
        if verdict == live_verdict:
            # Back to what the API shows: transitions queued meanwhile (e.g. during an API outage)
            # never became visible and are no longer true. Rotation events stay.
            _drop_transitions(state)
        elif verdict != state.reported:
            # A transition: one Event per change, so `kubectl describe` shows the history.
            state.pending_events += ((not outcome.ready, outcome.reason, outcome.message),)
        state.reported = self._verdicts.setdefault(verdict, verdict)
        # The newest verdict replaces any write still pending (None: the live status already says it).
        state.pending_status = patch
        if patch is not None or state.pending_events:
            self._queue.wake(entry)

    def observed(self, entry: Entry) -> None:
        """The watch showed a newer live status. If it already says the verdict this replica has
        yet to write (another replica wrote it first, e.g. while this one's write was retrying),
        that replica posted the transition's Event: ours stands down, and so does a write that
        would change nothing. Once our own write went through, the Events queued are ours."""
        state = entry.reporting
        outcome = entry.schedule.outcome
        if state.pending_status is None or outcome is None:
            return
        live = find_condition(entry.api.live_status.get("conditions"))
        if live is not None and (live.get("reason"), live.get("status") == "True") == state.reported:
            _drop_transitions(state)
            state.pending_status = self.desired_status(entry, outcome, self._interval_of(entry))

    def event(self, entry: Entry, *, warning: bool, reason: str, message: str) -> None:
        """Queue an Event that is not a transition (e.g. Rotated)."""
        entry.reporting.pending_events += ((warning, reason, message),)
        self._queue.wake(entry)

    # --- the queue's view -------------------------------------------------------------------

    def written(self, entry: Entry) -> asyncio.Future[None]:
        """Done once nothing is left to write for the credential (see StatusQueue.written)."""
        return self._queue.written(entry)

    def drop(self, entry: Entry) -> None:
        """The credential is forgotten: nothing more is written for it."""
        state = entry.reporting
        state.pending_status, state.pending_events, state.posting = None, (), False
        self._queue.drop(entry)

    async def stop(self, entries: Iterable[Entry], *, within: float = 0.0) -> None:
        """Stop writing: what is already decided (a verdict's status, its Event) is written for at
        most ``within`` seconds more; then nothing is written, and no task is left running."""
        entries = list(entries)
        if within > 0:
            pending = [future for future in map(self._queue.written, entries) if not future.done()]
            if pending:
                await asyncio.wait(pending, timeout=within)
        await self._queue.stop(entries)

    def _wanted(self, entry: Entry, now: float) -> tuple[Lane, float] | None:
        """What the credential needs written next, and from when (``now``: the loop time).

        The status first, at its own retry time: an Event still waits for the status write queued
        before it, since a replica that loses the race to write learns it from the 409 and drops its
        Event. Events at theirs: a refused Event waits for its own retry and never delays a status
        write. With nothing left, the retry times start afresh, as a new flush did (only the
        refusals logged are remembered, so that they are not logged again).
        """
        state = entry.reporting
        if state.pending_status is not None:
            return Lane.STATUS, _due(state.status_pace)
        if state.pending_events:
            due = _due(state.event_pace)
            # Due now, its status written: it counts as sent while it waits for a sender, as the
            # flush task sent it at once once the status write before it was accepted. A report of
            # the verdict our write made visible must not drop it (a retry after a failure may be).
            state.posting = due <= now
            return Lane.EVENT, due
        state.status_pace, state.event_pace = _rested(state.status_pace), _rested(state.event_pace)
        return None

    # --- writing ----------------------------------------------------------------------------

    async def _attempt(self, entry: Entry, lane: Lane) -> None:
        """One attempt at ``lane``, made by a worker of the queue. A bug here is logged, and the
        attempt retried after the supervisor's backoff: the status is never silently left unwritten."""
        try:
            if lane is Lane.STATUS:
                await self._write_status(entry)
            else:
                await self._post_event(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point: no bug may leave a status unwritten
            pace = _pace(entry.reporting, lane)
            pace.failures += 1
            delay = capped_doubling(RESTART_BASE, RESTART_CAP, pace.failures)
            pace.due = asyncio.get_running_loop().time() + delay
            log_bug(logger, f"Writing the {lane.value} of {entry.namespace}/{entry.name}", exc, retry_in=delay)
        finally:
            if lane is Lane.EVENT:
                entry.reporting.posting = False  # sent, or to be retried: _wanted says which is next

    async def _write_status(self, entry: Entry) -> None:
        """One attempt at the pending status patch."""
        state = entry.reporting
        patch = state.pending_status
        if patch is None:
            return
        # The Event queued with this write is ours once the write is accepted, even if it leaves the
        # queue meanwhile: the watch may show our own write before its answer comes, and observed()
        # cannot tell it from another replica's (a 409 would: then _reconsider decides).
        head = state.pending_events[0] if state.pending_events else None
        try:
            try:
                body = await self._sink.patch_status(entry.namespace, entry.name, patch, entry.api.resource_version)
            except StatusConflict:
                self._on_write("conflict")
                # Someone wrote first (another replica, a spec edit): decide again from
                # what the API says now. If it already says our verdict, so does its Event.
                logger.info(
                    "The status of %s/%s changed since it was read (HTTP 409 Conflict); re-reading it.", *entry.key
                )
                await self._reconsider(entry)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any API failure is retried
            self._on_write("failed")
            self._failed(entry, Lane.STATUS, exc)
            return
        self._on_write("ok" if body is not None else "gone")
        state.status_pace = None
        if state.pending_status is patch:
            state.pending_status = None
        if body is None:
            # Gone, though no DELETED event came (e.g. deleted while the watch was down).
            state.pending_events, state.posting = (), False
            self._forget(entry)
            return
        if head is not None and not any(queued is head for queued in state.pending_events):
            state.pending_events = (head, *state.pending_events)
        self._accepted(entry, body)

    async def _post_event(self, entry: Entry) -> None:
        """One attempt at the oldest Event queued."""
        state = entry.reporting
        event = state.pending_events[0]
        warning, reason, message = event
        try:
            await self._sink.post_event(
                entry.namespace, entry.name, entry.api.uid, warning=warning, reason=reason, message=message
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any API failure is retried
            self._failed(entry, Lane.EVENT, exc)
            return
        state.event_pace = None
        if state.pending_events and state.pending_events[0] is event:
            state.pending_events = state.pending_events[1:]

    def _failed(self, entry: Entry, lane: Lane, exc: Exception) -> None:
        pace = _pace(entry.reporting, lane)
        pace.failures += 1
        pace.due = asyncio.get_running_loop().time() + self._after_failure(entry, lane, exc, pace.failures)

    def _accepted(self, entry: Entry, body: dict[str, Any]) -> None:
        status = body.get("status")
        if isinstance(status, dict):
            entry.api.live_status = dict(status)
        version = (body.get("metadata") or {}).get("resourceVersion")
        if not older_version(version, entry.api.resource_version):
            entry.api.resource_version = version or entry.api.resource_version
        outcome = entry.schedule.outcome
        if entry.reporting.pending_status is None and outcome is not None:
            # A newer verdict may have found the old live status agreeing with it while
            # this write was in flight: make sure the API ends up saying the newest one.
            entry.reporting.pending_status = self._correction(entry, outcome)

    def _after_failure(self, entry: Entry, lane: Lane, exc: Exception, attempt: int) -> float:
        """How long to wait before the next write, logging the failure (once, if it is for good)."""
        what = lane.value
        status = getattr(exc, "status", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (409, 429):
            # Forbidden (RBAC), NotFound (Events), Invalid (422): retrying in seconds cannot help.
            delay = self._interval_of(entry)
            pace = _pace(entry.reporting, lane)
            if pace.refused != status:
                logger.error(
                    "Writing the %s of %s/%s was refused (%s); retrying every %.0fs. Check the operator's RBAC "
                    "and the object.",
                    what,
                    *entry.key,
                    _short_error(exc),
                    delay,
                )
                pace.refused = status
            return delay
        delay = capped_doubling(RETRY_BASE, RETRY_CAP, attempt)
        logger.warning(
            "Writing the %s of %s/%s failed (%s); retrying in %.1fs.",
            what,
            *entry.key,
            _short_error(exc),
            delay,
        )
        return delay

    async def _reconsider(self, entry: Entry) -> None:
        state = entry.reporting
        fresh = await self._sink.get(entry.namespace, entry.name)
        if fresh is None:
            state.pending_status = None
            return  # the next write sees the 404 and forgets the credential
        meta = fresh.get("metadata") or {}
        status = fresh.get("status")
        entry.api.live_status = dict(status) if isinstance(status, dict) else {}
        entry.api.resource_version = meta.get("resourceVersion") or entry.api.resource_version
        outcome = entry.schedule.outcome
        if outcome is None:
            state.pending_status = None
            return
        state.pending_status = self.desired_status(entry, outcome, self._interval_of(entry))
        live = find_condition(entry.api.live_status.get("conditions"))
        if live is not None and (live.get("reason"), live.get("status") == "True") == (
            str(outcome.reason),
            outcome.ready,
        ):
            _drop_transitions(state)

    def _correction(self, entry: Entry, outcome: Outcome) -> dict[str, Any] | None:
        """A patch only if the live status contradicts the latest verdict (not for lastCheckedTime)."""
        patch = self.desired_status(entry, outcome, self._interval_of(entry))
        if patch is None or set(patch) <= {"lastCheckedTime"}:
            return None
        return patch


def _ignore(result: str) -> None:
    pass


def _drop_transitions(state: Reporting) -> None:
    """The transitions queued never became visible and are no longer true: their Events go. Rotation
    Events stay, and so does the Event being posted (see ``Reporting.posting``)."""
    events = state.pending_events
    if not events:
        return  # every check of a settled credential comes here: nothing to make
    kept = events[:1] if state.posting else ()
    state.pending_events = (*kept, *(event for event in events[len(kept) :] if event[1] == EVENT_ROTATED))


def _pace(state: Reporting, lane: Lane) -> Pace:
    """The pace of ``lane``'s writes, made at their first failure."""
    if lane is Lane.STATUS:
        if state.status_pace is None:
            state.status_pace = Pace()
        return state.status_pace
    if state.event_pace is None:
        state.event_pace = Pace()
    return state.event_pace


def _due(pace: Pace | None) -> float:
    return 0.0 if pace is None else pace.due


def _rested(pace: Pace | None) -> Pace | None:
    """A pace once nothing of its kind is left to write: no retry time, no failures counted; kept
    only to remember the refusal logged."""
    if pace is None or pace.refused is None:
        return None
    pace.due, pace.failures = 0.0, 0
    return pace


def stable_identity(arn: str) -> str:
    """An assumed-role ARN without its session name: the same for every replica."""
    head, sep, tail = arn.partition(":assumed-role/")
    if not sep:
        return arn
    role = tail.split("/", 1)[0]
    return f"{head}{sep}{role}"


def older_version(version: Any, than: str | None) -> bool:
    """Whether resourceVersion ``version`` is older than ``than`` (numeric, as etcd's are)."""
    if not isinstance(version, str) or than is None:
        return False
    try:
        return int(version) < int(than)
    except ValueError:
        return False  # opaque versions: cannot tell, accept


def _older_than(timestamp: Any, seconds: float) -> bool:
    if not isinstance(timestamp, str):
        return True
    try:
        moment = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return True
    age = (datetime.datetime.now(datetime.UTC) - moment).total_seconds()
    return age >= seconds


def _short_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return type(exc).__name__
