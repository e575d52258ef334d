"""The credential engine: the one owner of resolved values.

It learns which credentials exist from watch events (:meth:`Engine.upsert` /
:meth:`Engine.remove`), asks the reader (:mod:`connector_credentials.core.reads`, the one owner of
reads) to read each one on its schedule, applies every answer the reader delivers
(:meth:`Engine._apply`: the only place a verdict is reached), keeps the value in memory, reports
verdicts to the :class:`~connector_credentials.core.status.StatusWriter`, and answers the socket.

There is no task per credential: plans live in the reader, answers arrive by callback. Nothing
here depends on kopf: a paused or slow handler cannot stop a sidecar from serving what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from connector_credentials.api.conditions import EVENT_ROTATED
from connector_credentials.api.models import format_duration
from connector_credentials.api.values import JsonKeyError, NeedleIndex, SecretValue, extract
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.allowlist import RoleAllowlist
from connector_credentials.core.answers import answer, answer_draining, answer_undeclared, describe
from connector_credentials.core.changes import Changes
from connector_credentials.core.entry import Entry, Key, Outcome, Served
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import Meter, NoMeter, SecretsPort
from connector_credentials.core.reads import Done, ReadKey, Reads
from connector_credentials.core.relists import unlisted
from connector_credentials.core.rotation import CURRENT, DEFERRED, REFRESHED, UNDECLARED, LabelMoved
from connector_credentials.core.status import FINAL_WRITES, StatusSink, StatusWriter
from connector_credentials.core.supervise import log_bug
from connector_credentials.core.timing import Plan, Timing
from connector_credentials.core.verdicts import (
    failed_outcome,
    invalid_spec_outcome,
    json_key_outcome,
    still_served_outcome,
    verified_outcome,
)

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Served"]  # Served: what serve() answers, for the socket server


class Engine:
    """Owns every resolved value; plans reads, applies answers, serves and reports."""

    def __init__(
        self, settings: OperatorSettings, port: SecretsPort, sink: StatusSink, *, metrics: Meter | None = None
    ) -> None:
        self.settings = settings
        #: What the operator counts (the socket server and the status writer report to it).
        self.metrics: Meter = metrics if metrics is not None else NoMeter()
        self._port = port
        self._entries: dict[Key, Entry] = {}
        #: Which credentials read each key: an answer is applied to all of them.
        self._readers: dict[ReadKey, set[Key]] = {}
        #: Keys read because a rotation event said so: the version it named, and when it was published.
        self._awaited: dict[ReadKey, tuple[str, float]] = {}
        self.reads = Reads(
            port, deliver=self._delivered, max_workers=settings.aws_max_workers, batch=settings.batch_reads
        )
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
        #: Told whenever what a credential answers may have changed (the socket's watch streams wait on it).
        self.changes = Changes()

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
        if not entry.api.observe(meta, body.get("status"), created=created):
            return
        if created:
            self.changes.notify(entry.key)
        else:
            self._writer.observed(entry)
        raw_spec = body.get("spec")
        if created or entry.api.spec_differs(raw_spec):
            self._new_spec(entry, raw_spec, created=created)
        else:
            self._noticed_elsewhere(entry)

    def _new_spec(self, entry: Entry, raw_spec: Any, *, created: bool) -> None:
        if entry.api.take_spec(raw_spec, self.settings.default_refresh_interval) and not created:
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
        self.changes.notify(entry.key)
        entry.schedule.outcome, entry.schedule.failures = None, 0
        self._read_as(entry, self._read_key(entry))

    def _read_key(self, entry: Entry) -> ReadKey | None:
        """What the spec makes the operator read; ``None`` (with the verdict concluded) if nothing."""
        spec = entry.api.spec
        if spec is None:
            self._conclude(entry, invalid_spec_outcome(str(entry.api.spec_error)))
            entry.schedule.due = float("inf")  # nothing to do until the spec changes
            return None
        role = spec.role
        if role is not None and (refusal := self.roles.refusal(role.arn)) is not None:
            # Not in CCRED_ASSUMABLE_ROLES (fixed for the process's life): decided here, AWS is not asked.
            self._conclude(entry, failed_outcome(refusal))
            entry.schedule.due = float("inf")
            return None
        return ReadKey(spec.arn, spec.version_id, spec.effective_stage, role)

    def _read_as(self, entry: Entry, key: ReadKey | None) -> None:
        """The credential reads ``key`` from now on (first check soon), and no longer what it read."""
        old = entry.api.reads
        if old is not None and old != key:
            self._unlink(entry.key, old)
        entry.api.reads = key
        if key is None:
            return
        self._readers.setdefault(key, set()).add(entry.key)
        now = asyncio.get_running_loop().time()
        entry.schedule.due = now
        self.reads.plan(key, self.timing.first(now))

    def _unlink(self, credential: Key, key: ReadKey) -> None:
        readers = self._readers.get(key)
        if readers is not None:
            readers.discard(credential)
            if not readers:
                del self._readers[key]
                self._awaited.pop(key, None)
                self.reads.forget(key)  # nobody reads it any more: its plan goes too

    def _reschedule(self, entry: Entry) -> None:
        """A new interval for a kept verdict: the next check and the status message follow it."""
        loop = asyncio.get_running_loop()
        schedule, interval = entry.schedule, self.interval(entry)
        if schedule.outcome is None or schedule.failures or entry.api.reads is None:
            return  # never checked, backing off, or nothing to read: the schedule in place stands
        checked = entry.held.fetched_mono if entry.held.fetched_mono is not None else loop.time()
        self._plan(entry, self.timing.refresh(interval, checked))
        outcome = schedule.outcome
        if outcome.ready and not outcome.transient and entry.api.spec is not None and entry.held.identity:
            outcome = schedule.outcome = verified_outcome(entry.api.spec, entry.held.identity, interval)
        self._writer.report(entry, outcome, interval)

    def remove(self, namespace: str, name: str, *, why: str = "the resource was deleted") -> None:
        entry = self._entries.pop((namespace, name), None)
        if entry is None:
            return
        self._drop_value(entry)
        if entry.api.reads is not None:
            self._unlink(entry.key, entry.api.reads)
        self._writer.drop(entry)
        self.changes.notify(entry.key)
        logger.info("Forgot %s/%s: %s.", namespace, name, why)

    def _forget_gone(self, entry: Entry) -> None:
        # The status writer found the object gone (404).
        if self._entries.get(entry.key) is entry:
            self.remove(*entry.key)

    def _hold(self, entry: Entry, value: SecretValue) -> None:
        previous = entry.held.value
        if previous != value:
            self.redaction.add(value)  # indexed before it is held, and the old one after: no gap
            if previous is not None:
                self.redaction.discard(previous)
        entry.held.value = value

    def _drop_value(self, entry: Entry) -> None:
        """The value goes, and with it its verification (a later transient failure is not Ready)."""
        if entry.held.value is not None:
            self.redaction.discard(entry.held.value)
        entry.held.drop()

    def forget_unlisted(self, listed: set[Key], list_version: str | None, namespaces: list[str] | None) -> list[Key]:
        """Forget what a fresh listing of ``namespaces`` (``None``: all) lacks (see core/relists.py)."""
        gone = unlisted(self._entries.values(), listed, list_version, namespaces)
        for key in gone:
            self.remove(*key, why="it is not in a fresh listing of the API (deleted while the watch was down)")
        return gone

    # --- the schedule ------------------------------------------------------------------

    def interval(self, entry: Entry) -> float:
        return entry.api.interval if entry.api.interval is not None else self.settings.default_refresh_interval

    def _plan(self, entry: Entry, plan: Plan) -> None:
        entry.schedule.due = plan.due
        if entry.api.reads is not None:
            self.reads.plan(entry.api.reads, plan)

    def _backing_off(self, entry: Entry, now: float) -> bool:
        """Failing transiently, and its retry (the backoff's pace) not due yet."""
        outcome = entry.schedule.outcome
        return outcome is not None and outcome.transient and now < entry.schedule.due

    def _read_soon(self, key: ReadKey) -> bool:
        """Read ``key`` now, or once CCRED_MIN_REFRESH_GAP since its last read has passed, in the next
        call of its lane (batched like any other). ``False``, and nothing planned, while every
        credential reading it backs off after failures: their retry reads it."""
        now = asyncio.get_running_loop().time()
        readers = [entry for c in self._readers.get(key, ()) if (entry := self._entries.get(c)) is not None]
        if all(self._backing_off(entry, now) for entry in readers):
            return False
        last = self.reads.last_started(key)
        at = now if last is None else max(now, last + self.settings.min_refresh_gap)
        self.reads.plan(key, Plan(at, at))
        return True

    # --- rotation: events from the queue, and what other replicas read ---------------------

    def rotated(self, event: LabelMoved) -> str:
        """A staging label moved (an event from CCRED_ROTATION_QUEUE_URL): read what it moved now.
        Returns what became of the event (the outcomes of core/rotation.py)."""
        keys = [key for key in self._readers if event.moves(key)]
        if not keys:
            return UNDECLARED
        outcome = CURRENT
        for key in keys:
            holders = [self._entries[c].held.version_id for c in self._readers[key] if c in self._entries]
            if all(version == event.version_id for version in holders):
                continue  # read already (by polling, or because another replica's status said so)
            if self._read_soon(key):
                outcome = REFRESHED
                if event.time is not None:
                    self._awaited[key] = (event.version_id, event.time.timestamp())
            elif outcome == CURRENT:
                outcome = DEFERRED
        return outcome

    def _noticed_elsewhere(self, entry: Entry) -> None:
        """The status names a version this replica does not hold: another replica read a rotation
        first (from the queue, or its own refresh). Read it again now, within the gap and the backoff."""
        key, seen, held = entry.api.reads, entry.api.live_status.get("versionId"), entry.held.version_id
        if key is None or key.version_id is not None or not held or not isinstance(seen, str) or seen == held:
            return
        if self._read_soon(key):
            logger.info(
                "The status of %s/%s names version %s, and this replica holds %s: reading it again.",
                *entry.key,
                seen,
                held,
            )

    # --- applying answers --------------------------------------------------------------

    def _delivered(self, key: ReadKey, done: Done) -> None:
        """A read of ``key`` finished: apply it to every credential that reads ``key`` now (one deleted,
        or recreated with another spec, while the read ran does not get it)."""
        awaited = self._awaited.get(key)
        if awaited is not None and done.fetched is not None and done.fetched.version_id == awaited[0]:
            del self._awaited[key]
            self.metrics.rotation_delivered(max(0.0, time.time() - awaited[1]))
        for credential in list(self._readers.get(key, ())):
            entry = self._entries.get(credential)
            if entry is None or entry.api.reads != key or done.seq <= entry.schedule.applied:
                continue  # gone, reads something else now, or already has a newer answer
            entry.schedule.applied = done.seq
            try:
                self._apply(entry, done)
            except Exception as exc:  # noqa: BLE001 - a bug in one credential must not stop its schedule
                self._unexpected(entry, exc)

    def _apply(self, entry: Entry, done: Done) -> None:
        """The only place a read becomes a verdict."""
        spec = entry.api.spec
        assert spec is not None  # reads is set only for a valid spec
        if done.error is not None:
            self._unexpected(entry, done.error)
            return
        interval = self.interval(entry)
        if done.failure is not None:
            outcome = self._on_failure(entry, done.failure, interval, done.seq)
        else:
            fetched, identity = done.fetched, str(done.identity)
            assert fetched is not None
            try:
                value = extract(fetched.raw, spec.json_key)
            except JsonKeyError as exc:
                outcome = self._settled(entry, json_key_outcome(spec, exc), interval, done.seq, drop=True)
            else:
                previous = entry.held.version_id
                self._hold(entry, value)
                entry.held.keep(value, fetched, spec.secret_arn, asyncio.get_running_loop().time())
                entry.held.identity, entry.held.credential_source = identity, self._port.credential_source
                outcome = self._settled(
                    entry, verified_outcome(spec, identity, interval), interval, done.seq, drop=False
                )
                # Not when another replica that noticed first has written the new version already.
                if previous and previous != fetched.version_id != entry.api.live_status.get("versionId"):
                    logger.info("Secret of %s/%s rotated: version %s -> %s.", *entry.key, previous, fetched.version_id)
                    message = f"Secret {spec.secret_arn} rotated: version {previous} -> {fetched.version_id}."
                    self._writer.event(entry, warning=False, reason=EVENT_ROTATED, message=message)
        self._conclude(entry, outcome)

    def _settled(self, entry: Entry, outcome: Outcome, interval: float, read: int, *, drop: bool) -> Outcome:
        """A definite answer of call ``read`` (verified, or failed for good): failures reset, next read
        at refreshInterval (jittered alike for the whole call, so that it is read in one call again)."""
        if drop:
            self._drop_value(entry)
        entry.schedule.failures = 0
        self._plan(entry, self.timing.refresh(interval, asyncio.get_running_loop().time(), read=read))
        return outcome

    def _conclude(self, entry: Entry, outcome: Outcome) -> None:
        """Record a verdict: log its transitions, and have the status say it."""
        schedule = entry.schedule
        previous = schedule.outcome
        schedule.outcome = outcome
        if previous is None or (previous.reason, previous.ready) != (outcome.reason, outcome.ready):
            log = logger.info if outcome.ready else logger.warning
            log("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        elif outcome.transient:
            # Repeated transient failures are logged each time (their pace is the backoff's).
            logger.warning("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        self._writer.report(entry, outcome, self.interval(entry))
        self.changes.notify(entry.key)

    def _unexpected(self, entry: Entry, exc: BaseException) -> None:
        """A bug, not an answer: counted like a failure (backoff up to the cap); the verdict stays."""
        schedule = entry.schedule
        schedule.failures += 1
        retry_in = self.timing.backoff(schedule.failures)
        # No traceback text: its frames and message could hold what was being parsed (the secret).
        log_bug(logger, f"Check of {entry.namespace}/{entry.name}", exc, retry_in=retry_in)
        self._plan(entry, self.timing.retry(asyncio.get_running_loop().time() + retry_in, self.interval(entry)))

    def _on_failure(self, entry: Entry, failure: AwsFailure, interval: float, read: int) -> Outcome:
        now = asyncio.get_running_loop().time()
        schedule = entry.schedule
        if not failure.transient:  # re-checked at refreshInterval; the value stops being served
            return self._settled(entry, failed_outcome(failure), interval, read, drop=True)
        schedule.failures += 1
        retry_in = self.timing.backoff(schedule.failures)
        staleness = self.settings.max_staleness
        verified = entry.held.verified_mono
        # Tolerance counts from when the value was due for refresh, so long intervals keep it too.
        if verified is not None and now - verified < interval + staleness:
            # Keep serving the verified value and stay Ready; re-check before it grows too old.
            stale_at = verified + interval + staleness
            self._plan(entry, self.timing.retry(min(now + retry_in, stale_at + 0.01), interval))
            return still_served_outcome(failure, staleness)
        self._drop_value(entry)
        self._plan(entry, self.timing.retry(now + retry_in, interval))
        return failed_outcome(failure)

    # --- serving -----------------------------------------------------------------------

    async def serve(self, namespace: str, name: str, *, refresh: bool) -> Served:
        entry = self._entries.get((namespace, name))
        loop = asyncio.get_running_loop()
        if entry is not None and not self._draining:
            schedule = entry.schedule
            backing_off = self._backing_off(entry, loop.time())
            if schedule.outcome is None:
                # Never checked: read from AWS now (ahead of every scheduled read) and wait for the answer.
                await self.check(entry, fresh=False)
            elif refresh and not backing_off:
                await self._refresh(entry)
            elif entry.held.value is not None and not self._fresh(entry) and not backing_off:
                # Older than refreshInterval: read now, but do not make the controller wait out an
                # AWS outage when a verified value is there to serve.
                await self._check_within(entry, self.settings.serve_wait)
            # Otherwise: fresh, or known failing (permanent: 502; transient: 503 until the backoff retries).
        # After a wait the credential may be deleted, or recreated under its name: answer for what is declared now.
        return self.current(namespace, name, refresh=refresh)

    def current(self, namespace: str, name: str, *, refresh: bool = False) -> Served:
        """What the socket answers for this credential now, without asking AWS."""
        live = self._entries.get((namespace, name))
        now = asyncio.get_running_loop().time()
        if live is None:
            return answer_undeclared(namespace, name, synced=self.synced.is_set())
        if self._draining:
            return answer_draining(live, now, refresh=refresh)
        return answer(live, now)

    async def check(self, entry: Entry, *, fresh: bool = True, not_before: float | None = None) -> None:
        """Have the reader read this credential now and wait until the answer is applied: a read that
        starts after this call if ``fresh`` (else one running may answer), or after ``not_before``.
        If the spec changes meanwhile, the read of the new spec is waited for instead."""
        if fresh and not_before is None:
            not_before = asyncio.get_running_loop().time()
        key = entry.api.reads
        while key is not None and self._entries.get(entry.key) is entry:
            await self.reads.hurry(key, not_before=not_before)
            key = None if entry.api.reads == key or self._draining else entry.api.reads

    async def _refresh(self, entry: Entry) -> None:
        """A read from AWS that started after this request arrived, at most one per credential per
        CCRED_MIN_REFRESH_GAP: a request within the gap waits for its end, and every request
        waiting then shares the one read that starts (or the one in flight)."""
        loop = asyncio.get_running_loop()
        asked = loop.time()
        last = self.reads.last_started(entry.api.reads) if entry.api.reads is not None else None
        if last is not None:
            await asyncio.sleep(max(0.0, last + self.settings.min_refresh_gap - asked))
        # Joins a read that started after this request arrived (another waiter's), if any.
        await self.check(entry, not_before=asked)

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
        # Shielded: the read goes on (and is applied) after the caller stops waiting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.check(entry, fresh=False)), seconds)

    def describe(self) -> list[dict[str, Any]]:
        """The declared credentials and their readiness, never values."""
        return describe(sorted(self._entries.values(), key=lambda e: e.key))

    # --- shutting down ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self) -> None:
        """Stop reading; keep serving what is held and writing what is decided. A socket read waiting
        for AWS is answered now, from what is held or with 503 ShuttingDown."""
        if self._draining:
            return
        self._draining = True
        self.reads.pause()
        self.changes.notify_all()  # what is answered from now on may differ

    async def finish_writing(self) -> None:
        """Once the socket has closed: what is decided gets FINAL_WRITES seconds, then no task writes."""
        await self._writer.stop(self._entries.values(), within=FINAL_WRITES)

    async def close(self) -> None:
        """Drop every value and stop every task (after the socket has closed)."""
        await self.drain()
        await self.finish_writing()
        self._closed = True
        for entry in self._entries.values():
            self._drop_value(entry)
        self._entries.clear()
        self._readers.clear()
        self._awaited.clear()
        self.reads.close()
