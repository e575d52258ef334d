"""The credential engine: the one owner of resolved values.

It learns which credentials exist from watch events (:meth:`Engine.upsert` /
:meth:`Engine.remove`), checks each one against AWS on its own schedule, keeps the value
in memory, writes the status through a :class:`StatusSink`, and answers the socket
server. The refresh path lives in :meth:`Engine._check_once` only.

Nothing here depends on kopf: a paused or slow handler cannot stop a sidecar from
serving what it already knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from connector_credentials.aws import AwsFailure, FetchedSecret, SecretsPort
from connector_credentials.conditions import (
    EVENT_ROTATED,
    PENDING_REASON,
    Reason,
    find_condition,
    now_rfc3339,
    same_condition,
    set_condition,
)
from connector_credentials.models import (
    ConnectorCredentialSpec,
    InvalidSpecError,
    SecretArn,
    format_duration,
    parse_spec,
)
from connector_credentials.settings import OperatorSettings
from connector_credentials.values import JsonKeyError, SecretValue, extract
from connector_credentials.wire import render_credential, rfc3339

logger = logging.getLogger(__name__)

Key = tuple[str, str]


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict of one check."""

    ready: bool
    reason: str
    message: str
    transient: bool = False


@dataclass
class Entry:
    """One declared credential: what the API says and what this replica resolved."""

    namespace: str
    name: str
    uid: str | None = None
    generation: int | None = None
    raw_spec: Any = None
    spec: ConnectorCredentialSpec | None = None
    spec_error: str | None = None
    #: refreshInterval in seconds, parsed once per spec (the hot path asks for it on every read).
    interval: float | None = None
    live_status: dict[str, Any] = field(default_factory=dict)
    resource_version: str | None = None

    value: SecretValue | None = None
    #: The 200 body, rendered once per fetch: the hot path serves these bytes as they are.
    wire: bytes | None = None
    version_id: str | None = None
    fetched_at: datetime.datetime | None = None
    fetched_mono: float | None = None
    verified_mono: float | None = None
    identity: str | None = None

    outcome: Outcome | None = None
    failures: int = 0
    served: bool = False

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    due: float = 0.0
    worker: asyncio.Task[None] | None = None
    inflight: asyncio.Future[None] | None = None
    status_task: asyncio.Task[None] | None = None
    pending_status: dict[str, Any] | None = None
    pending_events: list[tuple[bool, str, str]] = field(default_factory=list)
    reported: tuple[str, bool] | None = None

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    def drop_value(self) -> None:
        self.value = None
        self.wire = None
        self.version_id = None
        self.fetched_at = None
        self.fetched_mono = None


@dataclass(frozen=True, slots=True)
class Served:
    """The engine's answer to a socket request."""

    status: int
    value: SecretValue | None = None
    version_id: str | None = None
    arn: str | None = None
    fetched_at: datetime.datetime | None = None
    reason: str | None = None
    message: str | None = None
    retry_after: int | None = None
    #: The rendered 200 body, when the engine has it already.
    wire: bytes | None = None


class Engine:
    """Owns every resolved value; checks, serves and reports."""

    def __init__(self, settings: OperatorSettings, port: SecretsPort, sink: StatusSink) -> None:
        self.settings = settings
        self._port = port
        self._sink = sink
        self._entries: dict[Key, Entry] = {}
        self._executor = ThreadPoolExecutor(max_workers=settings.aws_max_workers, thread_name_prefix="aws")
        self._random = random.Random()  # noqa: S311 - jitter, not cryptography
        self._closed = False
        #: Set once the declared credentials were listed: before that, "unknown" may just mean "not yet".
        self.synced = asyncio.Event()

    # --- what exists -------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get_entry(self, namespace: str, name: str) -> Entry | None:
        return self._entries.get((namespace, name))

    def upsert(self, body: dict[str, Any]) -> None:
        """A watch event saw this object (added, modified, or listed at start)."""
        if self._closed:
            return
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if not namespace or not name:
            return
        if meta.get("deletionTimestamp"):
            self.remove(namespace, name)
            return
        entry = self._entries.get((namespace, name))
        if entry is not None and entry.uid and meta.get("uid") and entry.uid != meta.get("uid"):
            # Deleted and recreated under the same name while we were not looking.
            self.remove(namespace, name)
            entry = None
        created = entry is None
        if entry is None:
            entry = Entry(namespace=namespace, name=name)
            self._entries[entry.key] = entry
        if not created and _older(meta.get("resourceVersion"), entry.resource_version):
            # A body older than one already seen (a late listing, a queued event): it would
            # roll the live status back and make the next write move lastTransitionTime.
            return
        entry.resource_version = meta.get("resourceVersion") or entry.resource_version
        entry.uid = meta.get("uid") or entry.uid
        entry.generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
        status = body.get("status")
        entry.live_status = dict(status) if isinstance(status, dict) else {}
        raw_spec = body.get("spec")
        if created or _canonical(raw_spec) != _canonical(entry.raw_spec):
            if not created:
                logger.info("Spec of %s/%s changed; re-checking now.", namespace, name)
            entry.raw_spec = raw_spec
            try:
                entry.spec, entry.spec_error = parse_spec(raw_spec), None
                entry.interval = entry.spec.refresh_seconds(self.settings.default_refresh_interval)
            except InvalidSpecError as exc:
                entry.spec, entry.spec_error, entry.interval = None, str(exc), None
            entry.drop_value()
            entry.verified_mono = None
            entry.outcome = None
            entry.failures = 0
            entry.due = 0.0
            entry.wake.set()
        if entry.worker is None:
            entry.worker = asyncio.get_running_loop().create_task(
                self._worker(entry), name=f"ccred-worker:{namespace}/{name}"
            )

    def remove(self, namespace: str, name: str) -> None:
        entry = self._entries.pop((namespace, name), None)
        if entry is None:
            return
        entry.drop_value()
        for task in (entry.worker, entry.status_task):
            if task is not None:
                task.cancel()
        logger.info("Forgot %s/%s: the resource was deleted.", namespace, name)

    def values(self) -> Iterator[SecretValue]:
        for entry in list(self._entries.values()):
            if entry.value is not None:
                yield entry.value

    # --- the schedule ------------------------------------------------------------------

    def interval(self, entry: Entry) -> float:
        return entry.interval if entry.interval is not None else self.settings.default_refresh_interval

    def _jittered(self, seconds: float) -> float:
        spread = seconds * self.settings.jitter
        return max(0.0, seconds - spread + self._random.random() * 2 * spread)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2.0 ** max(0, failures - 1))
        # "Equal jitter": never below half the step, so retries cannot pile up at zero.
        return ceiling / 2 + self._random.random() * ceiling / 2

    async def _worker(self, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = entry.due - loop.time()
            if delay > 0:
                entry.wake.clear()
                with contextlib.suppress(TimeoutError):
                    # An invalid spec waits (due = inf) until a spec change wakes it.
                    await asyncio.wait_for(entry.wake.wait(), timeout=None if delay == float("inf") else delay)
                if loop.time() < entry.due:
                    continue
            entry.wake.clear()
            try:
                await self.check(entry)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Check of %s/%s failed unexpectedly; retrying later.", *entry.key)
                entry.due = loop.time() + self._backoff(entry.failures + 1)

    # --- checking ----------------------------------------------------------------------

    async def check(self, entry: Entry) -> None:
        """Check now, or join the check already under way (one AWS read per credential at a time)."""
        if entry.inflight is not None:
            await asyncio.shield(entry.inflight)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.inflight = future
        try:
            await self._check_once(entry)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            entry.inflight = None

    async def _check_once(self, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval(entry)
        previous_version = entry.version_id
        outcome: Outcome
        if entry.spec is None:
            outcome = Outcome(False, Reason.INVALID_SPEC, f"Invalid spec: {entry.spec_error}. Fix the resource.")
            entry.drop_value()
            entry.due = float("inf")  # nothing to do until the spec changes
        else:
            spec = entry.spec
            arn = spec.arn
            answer: tuple[str, FetchedSecret] | AwsFailure
            try:
                answer = await loop.run_in_executor(self._executor, self._read, spec, arn)
            except AwsFailure as exc:
                answer = exc
            if entry.spec is not spec:
                # The spec changed while AWS answered: that answer is about the old spec.
                await self._check_once(entry)
                return
            try:
                if isinstance(answer, AwsFailure):
                    raise answer
                identity, fetched = answer
                value = extract(fetched.raw, spec.json_key)
            except AwsFailure as failure:
                outcome = self._on_failure(entry, failure, interval)
            except JsonKeyError as exc:
                outcome = Outcome(
                    False,
                    Reason.JSON_KEY_NOT_FOUND,
                    f"Read {arn.arn} but jsonKey {spec.json_key!r} does not apply: {exc}. "
                    "Fix spec.jsonKey or the secret's content.",
                )
                entry.drop_value()
                entry.failures = 0
                entry.due = loop.time() + self._jittered(interval)
            else:
                now = datetime.datetime.now(datetime.UTC)
                entry.value = value
                entry.version_id = fetched.version_id
                entry.fetched_at = now
                entry.wire = render_credential(value, fetched.version_id, spec.secret_arn, now)
                entry.fetched_mono = entry.verified_mono = loop.time()
                entry.identity = identity
                entry.failures = 0
                entry.due = loop.time() + self._jittered(interval)
                selector = f"versionId {spec.version_id}" if spec.version_id else f"stage {spec.effective_stage}"
                key_text = f", key {spec.json_key!r}" if spec.json_key else ""
                outcome = Outcome(
                    True,
                    Reason.ACCESS_VERIFIED,
                    f"Read {arn.arn} ({selector}{key_text}) as {stable_identity(identity)}; re-checked every "
                    f"{format_duration(interval)}.",
                )
                if (
                    previous_version
                    and previous_version != fetched.version_id
                    # Another replica that noticed first has written the new version already.
                    and entry.live_status.get("versionId") != fetched.version_id
                ):
                    logger.info(
                        "Secret of %s/%s rotated: version %s -> %s.", *entry.key, previous_version, fetched.version_id
                    )
                    self._queue_event(
                        entry,
                        warning=False,
                        reason=EVENT_ROTATED,
                        message=f"Secret {arn.arn} rotated: version {previous_version} -> {fetched.version_id}.",
                    )
        previous_outcome = entry.outcome
        entry.outcome = outcome
        if previous_outcome is None or (previous_outcome.reason, previous_outcome.ready) != (
            outcome.reason,
            outcome.ready,
        ):
            log = logger.info if outcome.ready else logger.warning
            log("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        elif outcome.transient:
            # Repeated transient failures are logged each time (their pace is the backoff's).
            logger.warning("%s/%s: %s: %s", *entry.key, outcome.reason, outcome.message)
        self._write_status(entry, outcome, interval)

    def _read(self, spec: ConnectorCredentialSpec, arn: SecretArn) -> tuple[str, FetchedSecret]:
        """Runs in a worker thread: who we are, then the real read (not a proxy of it)."""
        identity = self._port.caller_identity(arn.region)
        fetched = self._port.get_secret(arn, version_id=spec.version_id, version_stage=spec.effective_stage)
        return identity, fetched

    def _on_failure(self, entry: Entry, failure: AwsFailure, interval: float) -> Outcome:
        loop = asyncio.get_running_loop()
        if not failure.transient:
            # Permanent answers are re-checked at refreshInterval, and the value stops being served.
            entry.drop_value()
            entry.verified_mono = None
            entry.failures = 0
            entry.due = loop.time() + self._jittered(interval)
            return Outcome(False, failure.reason, failure.message)
        entry.failures += 1
        retry_in = self._backoff(entry.failures)
        staleness = self.settings.max_staleness
        verified = entry.verified_mono
        # Tolerance counts from when the value was due for refresh, so long intervals keep it too.
        if verified is not None and loop.time() - verified < interval + staleness:
            # Keep serving the verified value and stay Ready; re-check before it grows too old.
            stale_at = verified + interval + staleness
            entry.due = min(loop.time() + retry_in, stale_at + 0.01)
            return Outcome(
                True,
                Reason.ACCESS_VERIFIED,
                f"The last check failed transiently ({failure.reason}): {failure.message} The value verified "
                f"before is still served, for at most {format_duration(staleness)} past its scheduled refresh.",
                transient=True,
            )
        entry.drop_value()
        entry.verified_mono = None
        entry.due = loop.time() + retry_in
        return Outcome(False, failure.reason, failure.message, transient=True)

    # --- status ------------------------------------------------------------------------

    def desired_status(self, entry: Entry, outcome: Outcome, interval: float) -> dict[str, Any] | None:
        """The status patch to write, or ``None`` when the live status already says it."""
        live = entry.live_status
        now = now_rfc3339()
        conditions = set_condition(
            live.get("conditions"),
            status=outcome.ready,
            reason=outcome.reason,
            message=outcome.message,
            observed_generation=entry.generation,
            now=now,
        )
        new_ready = find_condition(conditions)
        patch: dict[str, Any] = {}
        if not same_condition(find_condition(live.get("conditions")), new_ready):
            patch["conditions"] = conditions
        if entry.generation is not None and live.get("observedGeneration") != entry.generation:
            patch["observedGeneration"] = entry.generation
        if outcome.ready and entry.version_id and live.get("versionId") != entry.version_id:
            patch["versionId"] = entry.version_id
        live_identity = live.get("identityArn")
        if entry.identity and (
            not isinstance(live_identity, str) or stable_identity(live_identity) != stable_identity(entry.identity)
        ):
            # Compared without the STS session name, which differs per replica and per refresh.
            patch["identityArn"] = entry.identity
        if patch or _older_than(live.get("lastCheckedTime"), interval / 2):
            # Replicas that reach the same verdict skip the write while the last check is recent.
            patch["lastCheckedTime"] = now
        return patch or None

    async def _reconsider(self, entry: Entry) -> None:
        fresh = await self._sink.get(entry.namespace, entry.name)
        if fresh is None:
            entry.pending_status = None
            return  # the next write sees the 404 and forgets the credential
        meta = fresh.get("metadata") or {}
        status = fresh.get("status")
        entry.live_status = dict(status) if isinstance(status, dict) else {}
        entry.resource_version = meta.get("resourceVersion") or entry.resource_version
        outcome = entry.outcome
        if outcome is None:
            entry.pending_status = None
            return
        entry.pending_status = self.desired_status(entry, outcome, self.interval(entry))
        live = find_condition(entry.live_status.get("conditions"))
        if live is not None and (live.get("reason"), live.get("status") == "True") == (
            str(outcome.reason),
            outcome.ready,
        ):
            entry.pending_events = [e for e in entry.pending_events if e[1] == EVENT_ROTATED]

    def _correction(self, entry: Entry, outcome: Outcome) -> dict[str, Any] | None:
        """A patch only if the live status contradicts the latest verdict (not for lastCheckedTime)."""
        patch = self.desired_status(entry, outcome, self.interval(entry))
        if patch is None or set(patch) <= {"lastCheckedTime"}:
            return None
        return patch

    def _write_status(self, entry: Entry, outcome: Outcome, interval: float) -> None:
        patch = self.desired_status(entry, outcome, interval)
        old = find_condition(entry.live_status.get("conditions"))
        verdict = (str(outcome.reason), outcome.ready)
        live_verdict = None if old is None else (old.get("reason"), old.get("status") == "True")
        if verdict == live_verdict:
            # Back to what the API shows: transitions queued meanwhile (e.g. during an API outage)
            # never became visible and are no longer true. Rotation events stay.
            entry.pending_events = [e for e in entry.pending_events if e[1] == EVENT_ROTATED]
        elif verdict != entry.reported:
            # A transition: one Event per change, so `kubectl describe` shows the history.
            self._queue_event(entry, warning=not outcome.ready, reason=outcome.reason, message=outcome.message)
        entry.reported = verdict
        # The newest verdict replaces any write still pending (None: the live status already says it).
        entry.pending_status = patch
        if patch is None and not entry.pending_events:
            return
        if entry.status_task is None or entry.status_task.done():
            entry.status_task = asyncio.get_running_loop().create_task(
                self._flush(entry), name=f"ccred-status:{entry.namespace}/{entry.name}"
            )

    def _queue_event(self, entry: Entry, *, warning: bool, reason: str, message: str) -> None:
        entry.pending_events.append((warning, reason, message))
        if entry.status_task is None or entry.status_task.done():
            entry.status_task = asyncio.get_running_loop().create_task(
                self._flush(entry), name=f"ccred-status:{entry.namespace}/{entry.name}"
            )

    async def _flush(self, entry: Entry) -> None:
        """Write the latest desired status (and event) until the API accepts it."""
        attempt = 0
        while entry.pending_status is not None or entry.pending_events:
            patch = entry.pending_status
            event = entry.pending_events[0] if entry.pending_events else None
            try:
                if patch is not None:
                    try:
                        body = await self._sink.patch_status(entry.namespace, entry.name, patch, entry.resource_version)
                    except StatusConflict:
                        # Someone wrote first (another replica, a spec edit): decide again from
                        # what the API says now. If it already says our verdict, so does its Event.
                        logger.info(
                            "The status of %s/%s changed since it was read (HTTP 409 Conflict); re-reading it.",
                            *entry.key,
                        )
                        await self._reconsider(entry)
                        continue
                    if entry.pending_status is patch:
                        entry.pending_status = None
                    if body is None:
                        # Gone, though no DELETED event came (e.g. deleted while the watch was down).
                        entry.pending_events.clear()
                        entry.status_task = None  # this task: do not cancel it from remove()
                        if self._entries.get(entry.key) is entry:
                            self.remove(*entry.key)
                        return
                    status = body.get("status")
                    if isinstance(status, dict):
                        entry.live_status = dict(status)
                    version = (body.get("metadata") or {}).get("resourceVersion")
                    if not _older(version, entry.resource_version):
                        entry.resource_version = version or entry.resource_version
                    if entry.pending_status is None and entry.outcome is not None:
                        # A newer verdict may have found the old live status agreeing with it while
                        # this write was in flight: make sure the API ends up saying the newest one.
                        entry.pending_status = self._correction(entry, entry.outcome)
                if event is not None:
                    warning, reason, message = event
                    await self._sink.post_event(
                        entry.namespace, entry.name, entry.uid, warning=warning, reason=reason, message=message
                    )
                    if entry.pending_events and entry.pending_events[0] is event:
                        entry.pending_events.pop(0)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any API failure is retried
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** (attempt - 1))
                logger.warning(
                    "Writing the status of %s/%s failed (%s); retrying in %.1fs.",
                    *entry.key,
                    _short_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)

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
        if refresh or entry.outcome is None:
            # Asked to, or never checked: read from AWS now and wait for the answer.
            await self.check(entry)
        elif (
            entry.value is not None
            and (not entry.served or not self._fresh(entry))
            # While a transient failure backs off, reads serve the verified value and leave AWS alone.
            and not (entry.outcome.transient and asyncio.get_running_loop().time() < entry.due)
        ):
            # First read, or older than refreshInterval: read now, but do not make the controller
            # wait out an AWS outage when a verified value is there to serve.
            await self._check_within(entry, self.settings.serve_wait)
        # Otherwise: fresh, or known failing (permanent: 502; transient: 503 until the backoff retries).
        return self._answer(entry)

    def cached_body(self, namespace: str, name: str) -> bytes | None:
        """The hot path: the rendered 200 body while it may be served without asking AWS."""
        entry = self._entries.get((namespace, name))
        if entry is None or entry.wire is None or not entry.served or not self._fresh(entry):
            return None
        return entry.wire

    def _fresh(self, entry: Entry) -> bool:
        fetched = entry.fetched_mono
        return fetched is not None and asyncio.get_running_loop().time() - fetched < self.interval(entry)

    async def _check_within(self, entry: Entry, seconds: float) -> None:
        task = asyncio.ensure_future(self.check(entry))
        task.add_done_callback(_consume)
        await asyncio.wait({task}, timeout=seconds)

    def _answer(self, entry: Entry) -> Served:
        outcome = entry.outcome
        if entry.value is not None and entry.spec is not None:
            entry.served = True
            return Served(
                200,
                value=entry.value,
                wire=entry.wire,
                version_id=entry.version_id,
                arn=entry.spec.secret_arn,
                fetched_at=entry.fetched_at,
            )
        if outcome is None:
            return Served(503, reason=PENDING_REASON, message="Not checked yet; retry shortly.", retry_after=1)
        if outcome.transient:
            retry = max(1, int(entry.due - asyncio.get_running_loop().time()) + 1)
            return Served(503, reason=outcome.reason, message=outcome.message, retry_after=min(retry, 300))
        return Served(502, reason=outcome.reason, message=outcome.message)

    def describe(self) -> list[dict[str, Any]]:
        """The declared credentials and their readiness, never values."""
        result = []
        for entry in sorted(self._entries.values(), key=lambda e: e.key):
            outcome = entry.outcome
            ready = find_condition(entry.live_status.get("conditions")) if outcome is None else None
            result.append(
                {
                    "namespace": entry.namespace,
                    "name": entry.name,
                    "arn": entry.spec.secret_arn if entry.spec else None,
                    "ready": bool(outcome.ready) if outcome else (ready or {}).get("status") == "True",
                    "reason": outcome.reason if outcome else (ready or {}).get("reason", PENDING_REASON),
                    "message": outcome.message if outcome else (ready or {}).get("message", ""),
                    "versionId": entry.version_id,
                    "fetchedAt": rfc3339(entry.fetched_at),
                }
            )
        return result

    async def close(self) -> None:
        self._closed = True
        tasks = []
        for entry in self._entries.values():
            entry.drop_value()
            for task in (entry.worker, entry.status_task):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("A background check failed: %s", type(task.exception()).__name__)


def stable_identity(arn: str) -> str:
    """An assumed-role ARN without its session name: the same for every replica."""
    head, sep, tail = arn.partition(":assumed-role/")
    if not sep:
        return arn
    role = tail.split("/", 1)[0]
    return f"{head}{sep}{role}"


def _older(version: Any, than: str | None) -> bool:
    """Whether resourceVersion ``version`` is older than ``than`` (numeric, as etcd's are)."""
    if not isinstance(version, str) or than is None:
        return False
    try:
        return int(version) < int(than)
    except ValueError:
        return False  # opaque versions: cannot tell, accept


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


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
