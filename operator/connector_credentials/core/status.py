"""The status writer: what each credential's status should say, and getting it written.

It computes the desired status from a verdict, queues one Event per transition, and writes
both through a :class:`StatusSink` until the API accepts them: conflicts (409) are settled by
re-reading the object, transient API failures are retried with backoff, and answers that a
retry cannot fix (403, 404 on Events, 422) are logged once and retried at the refresh interval.
Status writes and Events are retried at their own pace: a refused Event never delays a status write.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from connector_credentials.api.conditions import (
    EVENT_ROTATED,
    find_condition,
    now_rfc3339,
    same_condition,
    set_condition,
)
from connector_credentials.core.supervise import supervise
from connector_credentials.core.timing import capped_doubling

if TYPE_CHECKING:
    from connector_credentials.core.entry import Entry, Outcome

logger = logging.getLogger("connector_credentials.core.engine")

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


@dataclass(slots=True)
class Reporting:
    """The writer's state for one credential."""

    task: asyncio.Task[None] | None = None
    #: The newest status patch not yet accepted (``None``: nothing to write).
    pending_status: dict[str, Any] | None = None
    #: Events not yet posted, oldest first: (warning, reason, message).
    pending_events: list[tuple[bool, str, str]] = field(default_factory=list)
    #: The last verdict (reason, ready) an Event was queued for.
    reported: tuple[str, bool] | None = None
    #: The HTTP status of the last write refused for good, by what ("status", "Event"): logged once,
    #: not every retry. Kept per kind: a status write that succeeds says nothing about Events.
    refused: dict[str, int] = field(default_factory=dict)
    #: Set when new work is queued, so that a flush waiting out an Event's retry writes it at once.
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Pace:
    """When writes of one kind (status or Event) may be tried again, and how many failed in a row."""

    what: str
    due: float = 0.0
    failures: int = 0


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
            state.pending_events = [e for e in state.pending_events if e[1] == EVENT_ROTATED]
        elif verdict != state.reported:
            # A transition: one Event per change, so `kubectl describe` shows the history.
            state.pending_events.append((not outcome.ready, outcome.reason, outcome.message))
        state.reported = verdict
        # The newest verdict replaces any write still pending (None: the live status already says it).
        state.pending_status = patch
        if patch is not None or state.pending_events:
            self._ensure_flushing(entry)

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
            state.pending_events = [e for e in state.pending_events if e[1] == EVENT_ROTATED]
            state.pending_status = self.desired_status(entry, outcome, self._interval_of(entry))

    def event(self, entry: Entry, *, warning: bool, reason: str, message: str) -> None:
        """Queue an Event that is not a transition (e.g. Rotated)."""
        entry.reporting.pending_events.append((warning, reason, message))
        self._ensure_flushing(entry)

    def _ensure_flushing(self, entry: Entry) -> None:
        task = entry.reporting.task
        if task is None or task.done():
            # Supervised: a bug in the loop is logged and the flush starts again; the status is not
            # silently left unwritten for the process's life.
            what = f"Writing the status of {entry.namespace}/{entry.name}"
            entry.reporting.task = asyncio.get_running_loop().create_task(
                supervise(what, lambda: self._flush(entry), log=logger),
                name=f"ccred-status:{entry.namespace}/{entry.name}",
            )
        else:
            entry.reporting.wake.set()  # the flush may be waiting out an Event's retry: write the status now

    # --- writing ----------------------------------------------------------------------------

    async def _flush(self, entry: Entry) -> None:
        """Write the latest desired status, then the Events, until the API accepts them.

        Status writes and Events are paced apart, each with its own retry delay: an Event the API
        refuses (no ``events/create``, an events quota, a terminating namespace) waits for its own
        retry and never delays a status write. An Event still waits for the status write queued
        before it: a replica that loses the race to write learns it from the 409 and drops its Event.
        """
        state = entry.reporting
        loop = asyncio.get_running_loop()
        status, events = _Pace("status"), _Pace("Event")
        while state.pending_status is not None or state.pending_events:
            state.wake.clear()
            now = loop.time()
            if state.pending_status is not None:
                if now >= status.due:
                    if not await self._write_status(entry, status):
                        return  # the object is gone: the credential is forgotten
                    continue
                due = status.due
            elif now >= events.due:
                await self._post_event(entry, events)
                continue
            else:
                due = events.due
            # Until the earlier retry is due, or new work is queued (report() sets wake).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(due - now):
                    await state.wake.wait()

    async def _write_status(self, entry: Entry, pace: _Pace) -> bool:
        """One attempt at the pending status patch; ``False`` if the object turned out to be gone."""
        state = entry.reporting
        patch = state.pending_status
        if patch is None:
            return True
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
                return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any API failure is retried
            self._on_write("failed")
            self._failed(entry, pace, exc)
            return True
        self._on_write("ok" if body is not None else "gone")
        self._succeeded(entry, pace)
        if state.pending_status is patch:
            state.pending_status = None
        if body is None:
            # Gone, though no DELETED event came (e.g. deleted while the watch was down).
            state.pending_events.clear()
            state.task = None  # this task: do not cancel it from remove()
            self._forget(entry)
            return False
        if head is not None and not any(queued is head for queued in state.pending_events):
            state.pending_events.insert(0, head)
        self._accepted(entry, body)
        return True

    async def _post_event(self, entry: Entry, pace: _Pace) -> None:
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
            self._failed(entry, pace, exc)
            return
        self._succeeded(entry, pace)
        if state.pending_events and state.pending_events[0] is event:
            state.pending_events.pop(0)

    def _failed(self, entry: Entry, pace: _Pace, exc: Exception) -> None:
        pace.failures += 1
        pace.due = asyncio.get_running_loop().time() + self._after_failure(entry, pace.what, exc, pace.failures)

    @staticmethod
    def _succeeded(entry: Entry, pace: _Pace) -> None:
        pace.failures, pace.due = 0, 0.0
        entry.reporting.refused.pop(pace.what, None)

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

    def _after_failure(self, entry: Entry, what: str, exc: Exception, attempt: int) -> float:
        """How long to wait before the next write, logging the failure (once, if it is for good)."""
        status = getattr(exc, "status", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (409, 429):
            # Forbidden (RBAC), NotFound (Events), Invalid (422): retrying in seconds cannot help.
            delay = self._interval_of(entry)
            if entry.reporting.refused.get(what) != status:
                logger.error(
                    "Writing the %s of %s/%s was refused (%s); retrying every %.0fs. Check the operator's RBAC "
                    "and the object.",
                    what,
                    *entry.key,
                    _short_error(exc),
                    delay,
                )
                entry.reporting.refused[what] = status
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
            state.pending_events = [e for e in state.pending_events if e[1] == EVENT_ROTATED]

    def _correction(self, entry: Entry, outcome: Outcome) -> dict[str, Any] | None:
        """A patch only if the live status contradicts the latest verdict (not for lastCheckedTime)."""
        patch = self.desired_status(entry, outcome, self._interval_of(entry))
        if patch is None or set(patch) <= {"lastCheckedTime"}:
            return None
        return patch


def _ignore(result: str) -> None:
    pass


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
