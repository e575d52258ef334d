"""The one owner of reads from Secrets Manager: what is planned, queued or running, when it leaves,
and in which call (docs/design.md, "One owner of reads").

The engine says what to read and by when (:meth:`Reads.plan`), that someone waits for it
(:meth:`Reads.hurry`), or that nobody reads it any more (:meth:`Reads.forget`); every finished
read comes back through one callback, ``deliver``. Nothing above this module keeps a second map
of reads in flight.

* One queued read per :class:`ReadKey`, shared by everyone who wants it.
* One sweep per lane (region and role): when a lane's earliest plan comes due, every key of the
  lane whose ``earliest`` has passed leaves, 20 per ``BatchGetSecretValue`` call. Keys no batch
  can carry (pinned versions or stages, a lane whose batch action IAM denies, an ARN a batch
  answer left out) are single ``GetSecretValue`` calls.
* A hurried key makes its lane's next call leave now, with whatever else may leave: on a free
  worker slot, else on the priority lane. Background calls use at most ``CCRED_AWS_MAX_WORKERS``
  slots; the rest wait here, where hurried reads can overtake them.

Everything runs on the event loop (only AWS calls run in threads); a bug in the sweep or in
applying an answer is logged and the sweep goes on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from connector_credentials.api.models import DEFAULT_VERSION_STAGE, AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import (
    BATCH_LIMIT,
    PRIORITY_THREADS,
    BatchRefused,
    FetchedSecret,
    SecretsPort,
)
from connector_credentials.core.supervise import log_bug
from connector_credentials.core.timing import Plan

logger = logging.getLogger(__name__)

#: After the batch action was denied for a lane, how long its reads stay single before a batch is tried again.
BATCH_RETRY_AFTER = 3600.0
_NEVER = float("inf")


class ReadKey(NamedTuple):
    """What is read: the secret, a version id or stage, and the role read as (None: the operator's own)."""

    arn: SecretArn
    version_id: str | None
    stage: str | None
    role: AssumedRole | None

    @property
    def batchable(self) -> bool:
        """Only the current version can be read in a batch (BatchGetSecretValue takes no selector)."""
        return self.version_id is None and self.stage in (None, DEFAULT_VERSION_STAGE)


#: Reads batched together: same region, same role.
LaneKey = tuple[str, AssumedRole | None]
#: What a call returns: who we are, and per secret ARN what AWS said.
_Answer = tuple[str, dict[str, FetchedSecret | AwsFailure]]


@dataclass(frozen=True, slots=True)
class Done:
    """A finished read. ``seq`` orders reads by when they started: an answer older than one already
    applied is not applied. Exactly one of ``fetched``, ``failure`` and ``error`` is set."""

    seq: int
    identity: str | None = None
    fetched: FetchedSecret | None = None
    failure: AwsFailure | None = None
    #: Not an answer from AWS but a bug (only its type is ever logged).
    error: BaseException | None = None


@dataclass(eq=False, slots=True)
class _Wanted:
    """Everything known about one key: its plan, whether someone waits, the read running."""

    key: ReadKey
    due: float = _NEVER
    earliest: float = _NEVER
    #: Identifies the heap entry that is this key's plan (older entries are skipped).
    stamp: int = 0
    #: Someone waits: leave with the next call of the lane.
    urgent: bool = False
    #: Resolved when the next read of the key (not started yet) has been delivered.
    next_read: asyncio.Future[None] | None = None
    #: The read running: when it started, and what resolves when it has been delivered.
    running: tuple[float, asyncio.Future[None]] | None = None
    last_started: float | None = None
    #: A batch answer did not mention it: read it alone from now on.
    alone: bool = False
    lane: _Lane | None = None


@dataclass(eq=False)
class _Lane:
    """The keys of one region and role waiting to leave: by due time, and those someone waits for."""

    key: LaneKey
    batched: bool
    heap: list[tuple[float, int, ReadKey]] = field(default_factory=list)
    urgent: dict[ReadKey, None] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Call:
    lane: _Lane
    keys: list[ReadKey]
    seq: int
    priority: bool
    #: Per key: resolved once its answer has been delivered.
    resolves: list[asyncio.Future[None]]


class Reads:
    """Plans, shares, batches and runs reads; see the module docstring."""

    def __init__(
        self,
        port: SecretsPort,
        *,
        deliver: Callable[[ReadKey, Done], None],
        max_workers: int,
        batch: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._port = port
        self._deliver = deliver
        self._batch = batch
        self._slots = max_workers
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="aws")
        self._priority_executor = ThreadPoolExecutor(max_workers=PRIORITY_THREADS, thread_name_prefix="aws-now")
        self._running = self._priority_running = 0
        self._wanted: dict[ReadKey, _Wanted] = {}
        self._lanes: dict[tuple[str, AssumedRole | None, bool], _Lane] = {}
        #: Per lane (region, role): until when its batch action stays refused.
        self._refused_until: dict[LaneKey, float] = {}
        self._stamps = itertools.count(1)
        self._seqs = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._kicked = False
        self._paused = False
        self._closed = False

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # --- what the engine asks ------------------------------------------------------------

    def plan(self, key: ReadKey, plan: Plan) -> None:
        """Read ``key`` by ``plan.due`` (from ``plan.earliest`` if that fills a batch). An earlier
        plan of the same key stands: it is read once, for everyone who wants it."""
        if self._closed:
            return
        wanted = self._wanted.setdefault(key, _Wanted(key))
        if wanted.due <= plan.due and wanted.earliest <= plan.earliest:
            return
        wanted.due, wanted.earliest = min(wanted.due, plan.due), min(wanted.earliest, plan.earliest)
        self._queue(wanted)
        if wanted.due < self._timer_at:
            self._kick()

    def forget(self, key: ReadKey) -> None:
        """Nobody reads ``key`` any more: its plan goes; a read of it running ends unheard."""
        wanted = self._wanted.pop(key, None)  # its heap entry no longer matches: skipped
        if wanted is not None:
            if wanted.lane is not None:
                wanted.lane.urgent.pop(key, None)
            _resolve(wanted.next_read)  # its waiters look again, and find their credential gone

    async def hurry(self, key: ReadKey, *, not_before: float | None = None) -> None:
        """Return once a read of ``key`` has been delivered, one that started at or after loop time
        ``not_before`` if given: the one running, else the next, which leaves now. Returns at once
        when the reader is paused (the operator drains)."""
        if self._paused or self._closed:
            return
        wanted = self._wanted.setdefault(key, _Wanted(key))
        if wanted.running is not None and (not_before is None or wanted.running[0] >= not_before):
            waiting = wanted.running[1]
        else:
            if wanted.next_read is None:
                wanted.next_read = asyncio.get_running_loop().create_future()
            waiting = wanted.next_read
            if not wanted.urgent:
                wanted.urgent = True
                self._queue(wanted)
                self._kick()
        # Shielded: a caller that gives up (its client went away) leaves the read to the others.
        await asyncio.shield(waiting)

    def last_started(self, key: ReadKey) -> float | None:
        """Loop time at which the last read of ``key`` started."""
        wanted = self._wanted.get(key)
        return wanted.last_started if wanted is not None else None

    def busy(self, within: float = 0.0) -> int:
        """How many keys are being read, waited for, or due within ``within`` seconds."""
        horizon = self._now() + within
        return sum(1 for w in self._wanted.values() if w.running is not None or w.urgent or w.due <= horizon)

    # --- queueing -----------------------------------------------------------------------

    def _refused(self, lane: LaneKey) -> bool:
        return self._refused_until.get(lane, -_NEVER) > self._now()

    def _lane_for(self, wanted: _Wanted) -> _Lane:
        key = wanted.key
        lane_key: LaneKey = (key.arn.region, key.role)
        batched = self._batch and key.batchable and not wanted.alone and not self._refused(lane_key)
        lane = self._lanes.get((*lane_key, batched))
        if lane is None:
            lane = self._lanes[(*lane_key, batched)] = _Lane(lane_key, batched)
        return lane

    def _queue(self, wanted: _Wanted) -> None:
        """(Re)file the key in its lane: by its due time, and among the urgent if someone waits."""
        lane = self._lane_for(wanted)
        if wanted.lane is not None and wanted.lane is not lane:
            wanted.lane.urgent.pop(wanted.key, None)
        wanted.lane = lane
        if wanted.urgent:
            lane.urgent[wanted.key] = None
        if wanted.due < _NEVER:
            wanted.stamp = next(self._stamps)
            heapq.heappush(lane.heap, (wanted.due, wanted.stamp, wanted.key))

    def _top(self, lane: _Lane) -> _Wanted | None:
        """The lane's plan due first (heap entries of plans since replaced or taken are dropped)."""
        while lane.heap:
            _, stamp, key = lane.heap[0]
            wanted = self._wanted.get(key)
            if wanted is not None and wanted.stamp == stamp and wanted.lane is lane and wanted.due < _NEVER:
                return wanted
            heapq.heappop(lane.heap)
        return None

    # --- the sweep ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Sweep soon (once, however many plans and hurries arrive meanwhile)."""
        if not self._kicked and not self._closed:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._sweep)

    def _sweep(self) -> None:
        self._kicked = False
        try:
            self._sweep_lanes()
        except Exception as exc:  # noqa: BLE001 - a bug must not stop every read: say it, sweep again soon
            log_bug(logger, "The read sweep", exc, retry_in=1.0)
            asyncio.get_running_loop().call_later(1.0, self._kick)

    def _sweep_lanes(self) -> None:
        if self._paused or self._closed:
            return
        now = self._now()
        for lane in list(self._lanes.values()):
            # Someone waits: leave now, on a free slot, else the priority lane if one of its threads is
            # free (else first in line when a call ends: queued in a thread pool, it could not be).
            while lane.urgent and (self._running < self._slots or self._priority_running < PRIORITY_THREADS):
                self._start(lane, self._take(lane, now, urgent=True), priority=self._running >= self._slots)
            while self._running < self._slots:
                top = self._top(lane)
                if top is None or top.due > now:
                    break
                self._start(lane, self._take(lane, now, urgent=False), priority=False)
        self._arm()

    def _take(self, lane: _Lane, now: float, *, urgent: bool) -> list[_Wanted]:
        """The next call's keys: those someone waits for first, then plans that may leave by now."""
        limit = BATCH_LIMIT if lane.batched else 1
        taken: list[_Wanted] = []
        if urgent:
            for key in list(itertools.islice(lane.urgent, limit)):
                taken.append(self._taken(self._wanted[key]))
        while len(taken) < limit:
            top = self._top(lane)
            if top is None or top.earliest > now:
                break
            taken.append(self._taken(top))
        return taken

    @staticmethod
    def _taken(wanted: _Wanted) -> _Wanted:
        """Off the lane: its heap entry is skipped from now on (it no longer matches)."""
        if wanted.lane is not None:
            wanted.lane.urgent.pop(wanted.key, None)
        wanted.due = wanted.earliest = _NEVER
        wanted.urgent = False
        return wanted

    def _arm(self) -> None:
        """Wake up when the earliest plan of a lane with a free slot comes due."""
        wake = _NEVER
        if self._running < self._slots:
            for lane in self._lanes.values():
                top = self._top(lane)
                if top is not None:
                    wake = min(wake, top.due)
        for name in [name for name, lane in self._lanes.items() if not lane.heap and not lane.urgent]:
            del self._lanes[name]
        if wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = wake
        if wake < _NEVER:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, wake - self._now()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, _NEVER
        self._sweep()

    # --- calls ----------------------------------------------------------------------------

    def _start(self, lane: _Lane, taken: list[_Wanted], *, priority: bool) -> None:
        if not taken:
            return
        loop = asyncio.get_running_loop()
        now = self._now()
        resolves: list[asyncio.Future[None]] = []
        for wanted in taken:
            running = wanted.next_read or loop.create_future()
            wanted.next_read = None
            wanted.running, wanted.last_started = (now, running), now
            resolves.append(running)
        call = _Call(lane, [w.key for w in taken], next(self._seqs), priority, resolves)
        if priority:
            self._priority_running += 1
        else:
            self._running += 1
        executor = self._priority_executor if priority else self._executor
        job = loop.run_in_executor(executor, self._call, lane, call.keys)
        job.add_done_callback(lambda done: self._finished(call, done))

    def _finished(self, call: _Call, job: asyncio.Future[_Answer]) -> None:
        if call.priority:
            self._priority_running -= 1
        else:
            self._running -= 1
        try:
            if self._closed or job.cancelled():
                return
            error = job.exception()
            if isinstance(error, BatchRefused):
                self._batch_refused(call, str(error))
                return
            for key, running in zip(call.keys, call.resolves, strict=True):
                done = self._outcome(call, key, job, error)
                if done is None:  # a batch answer did not mention it: read it alone, now
                    self._again(key, running, alone=True)
                    continue
                self._settle(key, running)
                if not self._paused and key in self._wanted:
                    self._deliver(key, done)  # it guards each credential: one's bug does not stop the others
                _resolve(running)
        except Exception as exc:  # noqa: BLE001 - whoever waits is let go; the sweep goes on
            log_bug(logger, "Handling a finished read", exc)
            for running in call.resolves:
                _resolve(running)
        finally:
            self._kick()

    @staticmethod
    def _outcome(call: _Call, key: ReadKey, job: asyncio.Future[_Answer], error: BaseException | None) -> Done | None:
        """What the call said about ``key`` (``None``: a batch answer left it out)."""
        if error is not None:
            return Done(call.seq, failure=error) if isinstance(error, AwsFailure) else Done(call.seq, error=error)
        identity, found = job.result()
        answer = found.get(key.arn.arn)
        if answer is None or isinstance(answer, AwsFailure):
            return None if answer is None else Done(call.seq, failure=answer)
        return Done(call.seq, identity=identity, fetched=answer)

    def _settle(self, key: ReadKey, running: asyncio.Future[None]) -> None:
        wanted = self._wanted.get(key)
        if wanted is not None and wanted.running is not None and wanted.running[1] is running:
            wanted.running = None

    def _again(self, key: ReadKey, running: asyncio.Future[None], *, alone: bool = False) -> None:
        """Queue a read that did not happen again, at once, keeping whoever waits for it."""
        wanted = self._wanted.get(key)
        if wanted is None:
            _resolve(running)
            return
        self._settle(key, running)
        wanted.alone = wanted.alone or alone
        if wanted.next_read is None:
            wanted.next_read = running
        else:
            wanted.next_read.add_done_callback(lambda _: _resolve(running))
        wanted.urgent = True  # it was due already
        self._queue(wanted)

    def _batch_refused(self, call: _Call, said: str) -> None:
        lane = call.lane.key
        if not self._refused(lane):  # batches of this lane in flight together are refused together: say it once
            self._refused_until[lane] = self._now() + BATCH_RETRY_AFTER
            _say_refused(lane, said)
        for key, running in zip(call.keys, call.resolves, strict=True):
            self._again(key, running)
        # What waits for a batch of this lane now goes alone too.
        for wanted in list(self._wanted.values()):
            if wanted.lane is call.lane and (wanted.urgent or wanted.due < _NEVER):
                self._queue(wanted)

    # --- the end --------------------------------------------------------------------------

    def pause(self) -> None:
        """No read starts from now on, and no answer is applied; whoever waits is let go."""
        self._paused = True
        for wanted in self._wanted.values():
            _resolve(wanted.next_read)
            _resolve(wanted.running[1] if wanted.running else None)

    def close(self) -> None:
        self.pause()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wanted.clear()
        self._lanes.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._priority_executor.shutdown(wait=False, cancel_futures=True)

    # --- in worker threads ----------------------------------------------------------------

    def _call(self, lane: _Lane, keys: Sequence[ReadKey]) -> _Answer:
        """Who we are, and the answer per secret ARN: one BatchGetSecretValue, or one GetSecretValue."""
        region, role = lane.key
        identity = self._port.caller_identity(region, role=role)
        if lane.batched:
            return identity, self._port.get_current_secrets(region, [key.arn for key in keys], role=role)
        key = keys[0]
        fetched = self._port.get_secret(key.arn, version_id=key.version_id, version_stage=key.stage, role=role)
        return identity, {key.arn.arn: fetched}


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _say_refused(lane: LaneKey, said: str) -> None:
    region, role = lane
    who = f"role {role.arn}" if role is not None else "the operator's own identity"
    logger.warning(
        "IAM denies secretsmanager:BatchGetSecretValue to %s in %s (%s); reading those secrets one per call "
        'instead, and trying a batch again in %d minutes. Allow the action on "*" to save calls '
        "(see docs/install-eks.md).",
        who,
        region,
        said or "AccessDenied",
        BATCH_RETRY_AFTER // 60,
    )
