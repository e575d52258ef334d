"""The credential engine: the one owner of resolved values.

It learns which credentials exist from watch events (:meth:`Engine.upsert` /
:meth:`Engine.remove`), checks each one against AWS on its own schedule, keeps the value
in memory, reports verdicts to the :class:`~connector_credentials.core.status.StatusWriter`, and
answers the socket server. The refresh path lives in :meth:`Engine._check_once` only.

Nothing here depends on kopf: a paused or slow handler cannot stop a sidecar from
serving what it already knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from collections.abc import Iterator
from typing import Any

from connector_credentials.api.conditions import EVENT_ROTATED, PENDING_REASON, Reason
from connector_credentials.api.models import (
    ConnectorCredentialSpec,
    InvalidSpecError,
    format_duration,
    parse_spec,
)
from connector_credentials.api.values import JsonKeyError, NeedleIndex, SecretValue, extract
from connector_credentials.api.wire import render_credential
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.allowlist import RoleAllowlist
from connector_credentials.core.answers import SHUTTING_DOWN, answer, answer_draining, describe
from connector_credentials.core.entry import ApiView, Entry, Held, Key, Outcome, Schedule, Served
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import Meter, NoMeter, SecretsPort
from connector_credentials.core.reads import ReadResult, SecretReader
from connector_credentials.core.status import (
    StatusConflict,
    StatusSink,
    StatusWriter,
    older_version,
    stable_identity,
)
from connector_credentials.core.timing import Timing
from connector_credentials.core.verdicts import (
    failed_outcome,
    invalid_spec_outcome,
    json_key_outcome,
    verified_outcome,
)

logger = logging.getLogger(__name__)


__all__ = [
    "SHUTTING_DOWN",
    "ApiView",
    "Engine",
    "Entry",
    "Held",
    "Key",
    "Outcome",
    "Schedule",
    "Served",
    "StatusConflict",
    "StatusSink",
    "stable_identity",
]


class Engine:
    """Owns every resolved value; checks, serves and reports."""

    def __init__(
        self, settings: OperatorSettings, port: SecretsPort, sink: StatusSink, *, metrics: Meter | None = None
    ) -> None:
        self.settings = settings
        #: What the operator counts (the socket server and the status writer report to it).
        self.metrics: Meter = metrics if metrics is not None else NoMeter()
        self._port = port
        self._entries: dict[Key, Entry] = {}
        self.reader = SecretReader(port, max_workers=settings.aws_max_workers, batch=settings.batch_reads)
        self.timing = Timing(settings)
        self.roles = RoleAllowlist(settings.assumable_roles)
        self._writer = StatusWriter(
            sink,
            interval_of=self.interval,
            forget=self._forget_gone,
            heartbeat=settings.status_heartbeat,
            on_write=self.metrics.status_written,
        )
        self._closed = False
        self._draining = False
        #: The forms of the values held, for the redacting log filter: updated per value by _hold/_drop_value.
        self.redaction = NeedleIndex()
        #: Set once the declared credentials were listed: before that, "unknown" may just mean "not yet".
        self.synced = asyncio.Event()

    # --- what exists -------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get_entry(self, namespace: str, name: str) -> Entry | None:
        return self._entries.get((namespace, name))

    def upsert(self, body: dict[str, Any]) -> None:
        """A watch event saw this object (added, modified, or listed at start)."""
        if self._closed or self._draining:
            return
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if not namespace or not name:
            return
        if meta.get("deletionTimestamp"):
            self.remove(namespace, name)
            return
        entry = self._entries.get((namespace, name))
        if entry is not None and entry.api.uid and meta.get("uid") and entry.api.uid != meta.get("uid"):
            # Deleted and recreated under the same name while we were not looking.
            self.remove(namespace, name)
            entry = None
        created = entry is None
        if entry is None:
            entry = Entry(namespace=namespace, name=name)
            self._entries[entry.key] = entry
        api = entry.api
        if not created and older_version(meta.get("resourceVersion"), api.resource_version):
            # A body older than one already seen (a late listing, a queued event): it would
            # roll the live status back and make the next write move lastTransitionTime.
            return
        api.resource_version = meta.get("resourceVersion") or api.resource_version
        api.uid = meta.get("uid") or api.uid
        api.generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
        status = body.get("status")
        api.live_status = dict(status) if isinstance(status, dict) else {}
        if not created:
            self._writer.observed(entry)
        raw_spec = body.get("spec")
        if created or _canonical(raw_spec) != _canonical(api.raw_spec):
            self._new_spec(entry, raw_spec, created=created)
        if entry.schedule.worker is None:
            entry.schedule.worker = asyncio.get_running_loop().create_task(
                self._worker(entry), name=f"ccred-worker:{namespace}/{name}"
            )

    def _new_spec(self, entry: Entry, raw_spec: Any, *, created: bool) -> None:
        api, schedule = entry.api, entry.schedule
        before = api.spec
        api.raw_spec = raw_spec
        try:
            api.spec, api.spec_error = parse_spec(raw_spec), None
            api.interval = api.spec.refresh_seconds(self.settings.default_refresh_interval)
        except InvalidSpecError as exc:
            api.spec, api.spec_error, api.interval = None, str(exc), None
        if not created and before is not None and api.spec is not None and _reads(before) == _reads(api.spec):
            # Only how often it is checked changed: what is read, and so the value and verdict, stay.
            logger.info(
                "Spec of %s/%s changed (not what is read); re-checked every %s now.",
                *entry.key,
                format_duration(self.interval(entry)),
            )
            self._reschedule(entry)
            return
        if not created:
            logger.info("Spec of %s/%s changed; re-checking now.", *entry.key)
        self._drop_value(entry)
        entry.held.verified_mono = None
        schedule.outcome = None
        schedule.failures = 0
        schedule.due = 0.0
        schedule.wake.set()

    def _reschedule(self, entry: Entry) -> None:
        """A new interval for a kept verdict: the next check and the status message follow it."""
        loop = asyncio.get_running_loop()
        schedule, interval = entry.schedule, self.interval(entry)
        if schedule.outcome is None or schedule.failures:
            return  # never checked, or backing off: the schedule in place stands
        checked = entry.held.fetched_mono if entry.held.fetched_mono is not None else loop.time()
        schedule.due = checked + self.timing.jittered(interval)
        schedule.wake.set()
        outcome = schedule.outcome
        if outcome.ready and not outcome.transient and entry.api.spec is not None and entry.held.identity:
            outcome = schedule.outcome = verified_outcome(entry.api.spec, entry.held.identity, interval)
        self._writer.report(entry, outcome, interval)

    def remove(self, namespace: str, name: str) -> None:
        entry = self._entries.pop((namespace, name), None)
        if entry is None:
            return
        self._drop_value(entry)
        for task in (entry.schedule.worker, entry.reporting.task):
            if task is not None:
                task.cancel()
        logger.info("Forgot %s/%s: the resource was deleted.", namespace, name)

    def _forget_gone(self, entry: Entry) -> None:
        # The status writer found the object gone (404); it is its own task: do not cancel it.
        if self._entries.get(entry.key) is entry:
            self.remove(*entry.key)

    def values(self) -> Iterator[SecretValue]:
        for entry in list(self._entries.values()):
            if entry.held.value is not None:
                yield entry.held.value

    def _hold(self, entry: Entry, value: SecretValue) -> None:
        previous = entry.held.value
        if previous != value:
            self.redaction.add(value)  # indexed before it is held, and the old one after: no gap
            if previous is not None:
                self.redaction.discard(previous)
        entry.held.value = value

    def _drop_value(self, entry: Entry) -> None:
        if entry.held.value is not None:
            self.redaction.discard(entry.held.value)
        entry.held.drop()

    def forget_unlisted(self, listed: set[Key], list_version: str | None, namespaces: list[str] | None) -> list[Key]:
        """Forget what a fresh listing of ``namespaces`` (``None``: all) no longer holds; return what was forgotten.

        A watch that cannot resume is listed again, and a listing sends no DELETED for what
        vanished while the watch was down. An entry missing from the listing is gone, unless it
        was last seen at a resourceVersion newer than the listing's (it came after the snapshot).
        Versions that are not numbers cannot be ordered: such an entry is kept.
        """
        gone: list[Key] = []
        for key, entry in list(self._entries.items()):
            if key in listed or (namespaces is not None and key[0] not in namespaces):
                continue
            try:
                newer = int(entry.api.resource_version or "") > int(list_version or "")
            except ValueError:
                newer = True
            if not newer:
                logger.info(
                    "%s/%s is not in a fresh listing of the API: it was deleted while the watch was down.", *key
                )
                self.remove(*key)
                gone.append(key)
        return gone

    # --- the schedule ------------------------------------------------------------------

    def interval(self, entry: Entry) -> float:
        return entry.api.interval if entry.api.interval is not None else self.settings.default_refresh_interval

    async def _worker(self, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        schedule = entry.schedule
        while True:
            delay = schedule.due - loop.time()
            if delay > 0:
                schedule.wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives as the event is set, and the worker would then never stop.
                with contextlib.suppress(TimeoutError):
                    # An invalid spec waits (due = inf) until a spec change wakes it.
                    async with asyncio.timeout(None if delay == float("inf") else delay):
                        await schedule.wake.wait()
                if loop.time() < schedule.due:
                    continue
            schedule.wake.clear()
            try:
                await self.check(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not become a hot loop
                # Counted like any failure: backoff up to the cap; the last verdict stays as it is.
                schedule.failures += 1
                retry_in = self.timing.backoff(schedule.failures)
                schedule.due = loop.time() + retry_in
                # No traceback: its frames and message could hold what was being parsed (the secret).
                logger.error(  # noqa: TRY400
                    "Check of %s/%s failed unexpectedly (%s); retrying in %.1fs.",
                    *entry.key,
                    type(exc).__name__,
                    retry_in,
                )

    # --- checking ----------------------------------------------------------------------

    async def check(self, entry: Entry, *, urgent: bool = False, not_before: float | None = None) -> None:
        """Check now, or join the check already under way (one AWS read per credential at a time).

        ``urgent``: someone waits for the answer (the read takes the priority lane);
        ``not_before``: and it must be a read that starts after this loop time (``?refresh=true``).
        """
        schedule = entry.schedule
        if schedule.inflight is not None:
            recent = not_before is None or (schedule.last_read or 0.0) >= not_before
            if urgent and entry.api.spec is not None:
                spec = entry.api.spec
                self.reader.expedite(spec.arn, spec.version_id, spec.effective_stage, role=spec.role)
            await asyncio.shield(schedule.inflight)
            if not recent:  # it started before this request: read anew, or join a read started since
                await self.check(entry, urgent=urgent, not_before=not_before)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        schedule.inflight = future
        try:
            await self._check_once(entry, urgent=urgent, not_before=not_before)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            schedule.inflight = None

    async def _check_once(self, entry: Entry, *, urgent: bool = False, not_before: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval(entry)
        schedule, held = entry.schedule, entry.held
        previous_version = held.version_id
        outcome: Outcome
        spec = entry.api.spec
        if spec is None:
            outcome = invalid_spec_outcome(str(entry.api.spec_error))
            self._drop_value(entry)
            schedule.due = float("inf")  # nothing to do until the spec changes
        else:
            arn, role = spec.arn, spec.role
            answer: ReadResult | AwsFailure
            schedule.last_read = loop.time()
            try:
                if role is not None and (refusal := self.roles.refusal(role.arn)) is not None:
                    raise refusal  # not in CCRED_ASSUMABLE_ROLES: decided here, AWS is not asked
                if urgent:
                    answer = await self.reader.read_now(
                        arn, spec.version_id, spec.effective_stage, not_before=not_before, role=role
                    )
                else:
                    window = self.timing.batch_window(interval, first=schedule.outcome is None)
                    answer = await self.reader.read(
                        arn, spec.version_id, spec.effective_stage, window=window, role=role
                    )
            except AwsFailure as exc:
                answer = exc
            if entry.api.spec is not spec:
                # The spec changed while AWS answered: that answer is about the old spec.
                await self._check_once(entry, urgent=urgent, not_before=not_before)
                return
            try:
                if isinstance(answer, AwsFailure):
                    raise answer
                identity, fetched = answer
                value = extract(fetched.raw, spec.json_key)
            except AwsFailure as failure:
                outcome = self._on_failure(entry, failure, interval)
            except JsonKeyError as exc:
                outcome = json_key_outcome(spec, exc)
                self._drop_value(entry)
                schedule.failures = 0
                schedule.due = self._next_due(spec, interval)
            else:
                now = datetime.datetime.now(datetime.UTC)
                self._hold(entry, value)
                held.version_id = fetched.version_id
                held.fetched_at = now
                held.body = render_credential(value, fetched.version_id, spec.secret_arn, now)
                held.fetched_mono = held.verified_mono = loop.time()
                held.identity = identity
                held.credential_source = self._port.credential_source
                schedule.failures = 0
                schedule.due = self._next_due(spec, interval)
                outcome = verified_outcome(spec, identity, interval)
                if (
                    previous_version
                    and previous_version != fetched.version_id
                    # Another replica that noticed first has written the new version already.
                    and entry.api.live_status.get("versionId") != fetched.version_id
                ):
                    logger.info(
                        "Secret of %s/%s rotated: version %s -> %s.", *entry.key, previous_version, fetched.version_id
                    )
                    self._writer.event(
                        entry,
                        warning=False,
                        reason=EVENT_ROTATED,
                        message=f"Secret {arn.arn} rotated: version {previous_version} -> {fetched.version_id}.",
                    )
        # The worker may be asleep on an older due time (this check came from a socket read): wake
        # it so that it sleeps until the new one (a backoff retry may be due much sooner).
        schedule.wake.set()
        previous = schedule.outcome
        schedule.outcome = outcome
        if previous is None or (previous.reason, previous.ready) != (outcome.reason, outcome.ready):
            log = logger.info if outcome.ready else logger.warning
            log("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        elif outcome.transient:
            # Repeated transient failures are logged each time (their pace is the backoff's).
            logger.warning("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        self._writer.report(entry, outcome, interval)

    def _next_due(self, spec: ConnectorCredentialSpec, interval: float) -> float:
        return self.timing.next_due(spec, interval, asyncio.get_running_loop().time())

    def _on_failure(self, entry: Entry, failure: AwsFailure, interval: float) -> Outcome:
        loop = asyncio.get_running_loop()
        schedule = entry.schedule
        if not failure.transient:
            # Permanent answers are re-checked at refreshInterval, and the value stops being served.
            self._drop_value(entry)
            entry.held.verified_mono = None
            schedule.failures = 0
            spec = entry.api.spec
            schedule.due = self._next_due(spec, interval) if spec else loop.time() + self.timing.jittered(interval)
            return failed_outcome(failure)
        schedule.failures += 1
        retry_in = self.timing.backoff(schedule.failures)
        staleness = self.settings.max_staleness
        verified = entry.held.verified_mono
        # Tolerance counts from when the value was due for refresh, so long intervals keep it too.
        if verified is not None and loop.time() - verified < interval + staleness:
            # Keep serving the verified value and stay Ready; re-check before it grows too old.
            stale_at = verified + interval + staleness
            schedule.due = min(loop.time() + retry_in, stale_at + 0.01)
            return Outcome(
                True,
                Reason.ACCESS_VERIFIED,
                f"The last check failed transiently ({failure.reason}): {failure.message} The value verified "
                f"before is still served, for at most {format_duration(staleness)} past its scheduled refresh.",
                transient=True,
            )
        self._drop_value(entry)
        entry.held.verified_mono = None
        schedule.due = loop.time() + retry_in
        return failed_outcome(failure)

    # --- serving -----------------------------------------------------------------------

    async def serve(self, namespace: str, name: str, *, refresh: bool) -> Served:
        entry = self._entries.get((namespace, name))
        if entry is None and not self.synced.is_set():
            return Served(
                503,
                reason=PENDING_REASON,
                message="The operator is still loading the declared credentials; retry shortly.",
                retry_after=1,
            )
        if entry is None:
            return Served(
                404,
                reason="NotFound",
                message=f"No ConnectorCredential {namespace}/{name} is declared (or it is in a namespace this "
                "operator does not watch).",
            )
        if self._draining:
            return answer_draining(entry, asyncio.get_running_loop().time(), refresh=refresh)
        schedule = entry.schedule
        loop = asyncio.get_running_loop()
        backing_off = schedule.outcome is not None and schedule.outcome.transient and loop.time() < schedule.due
        if schedule.outcome is None:
            # Never checked: read from AWS now (ahead of every scheduled read) and wait for the answer.
            await self.check(entry, urgent=True)
        elif refresh and not backing_off:
            await self._refresh(entry)
        elif entry.held.value is not None and not self._fresh(entry) and not backing_off:
            # Older than refreshInterval: read now, but do not make the controller wait out an
            # AWS outage when a verified value is there to serve.
            await self._check_within(entry, self.settings.serve_wait)
        # Otherwise: fresh, or known failing (permanent: 502; transient: 503 until the backoff retries).
        return self._answer(entry)

    async def _refresh(self, entry: Entry) -> None:
        """A read from AWS that started after this request arrived, at most one per credential per
        CCRED_MIN_REFRESH_GAP: a request within the gap waits for its end, and every request
        waiting then shares the one read that starts (or the one in flight)."""
        schedule, loop = entry.schedule, asyncio.get_running_loop()
        asked = loop.time()
        if schedule.last_read is not None:
            wait = schedule.last_read + self.settings.min_refresh_gap - asked
            if wait > 0:
                await asyncio.sleep(wait)
        # Joins a read that started after this request arrived (another waiter's), if any.
        await self.check(entry, urgent=True, not_before=asked)

    def cached_body(self, namespace: str, name: str) -> bytes | None:
        """The hot path: the rendered 200 body while it may be served without asking AWS."""
        entry = self._entries.get((namespace, name))
        if entry is None or entry.held.body is None:
            return None
        if self._draining or self._fresh(entry):
            return entry.held.body.data
        return None

    def _fresh(self, entry: Entry) -> bool:
        fetched = entry.held.fetched_mono
        return fetched is not None and asyncio.get_running_loop().time() - fetched < self.interval(entry)

    async def _check_within(self, entry: Entry, seconds: float) -> None:
        task = asyncio.ensure_future(self.check(entry, urgent=True))
        task.add_done_callback(_consume)
        await asyncio.wait({task}, timeout=seconds)

    def _answer(self, entry: Entry) -> Served:
        return answer(entry, asyncio.get_running_loop().time())

    def describe(self) -> list[dict[str, Any]]:
        """The declared credentials and their readiness, never values."""
        return describe(sorted(self._entries.values(), key=lambda e: e.key))

    # --- shutting down ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self) -> None:
        """Stop checking and writing; keep serving what is held (the socket is still open)."""
        if self._draining:
            return
        self._draining = True
        tasks = []
        for entry in self._entries.values():
            for task in (entry.schedule.worker, entry.reporting.task):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Drop every value and stop every task (after the socket has closed)."""
        await self.drain()
        self._closed = True
        for entry in self._entries.values():
            self._drop_value(entry)
        self._entries.clear()
        self.reader.close()


def _reads(spec: ConnectorCredentialSpec) -> tuple[Any, ...]:
    """What a spec makes the operator read: a change here invalidates the value held."""
    return (spec.secret_arn, spec.version_id, spec.effective_stage, spec.json_key, spec.role)


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("A background check failed: %s", type(task.exception()).__name__)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
