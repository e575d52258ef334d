"""Reads from Secrets Manager: batched, shared, bounded, with a lane for reads someone waits on.

The engine asks for *what* to read (a :data:`ReadKey`: the secret, and a version id or stage);
:class:`SecretReader` decides *how*:

* **Shared.** Credentials that ask for the same key while a read of it is queued or running
  share that one read (their verdicts may still differ by ``jsonKey``).
* **Batched.** Reads of the current version (no ``versionId``, stage ``AWSCURRENT``) wait in a
  queue per region and role (``spec.roleArn``: reads as one role never share a call, or a
  read, with reads as another, or as the operator's own identity) for at most their *window*
  (the engine passes ``min(1 s, 2 % of the interval)``) and leave in ``BatchGetSecretValue``
  calls of up to 20; a full batch leaves at once. Other reads are single ``GetSecretValue`` calls.
* **Bounded.** At most ``CCRED_AWS_MAX_WORKERS`` calls run at a time; the rest wait their turn
  here, not in a thread pool's queue, so a read someone waits on can still overtake them.
* **Priority lane.** A read the socket waits on (a credential not checked yet) leaves at once
  on two threads of its own, whatever is queued (see :meth:`SecretReader.read`).
* **Fallback.** When IAM denies ``secretsmanager:BatchGetSecretValue`` the reads of that batch,
  and every read for the next hour, are single calls; that is logged once (then once an hour).

All of this runs on the event loop; only the AWS calls run in threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

from connector_credentials.api.models import DEFAULT_VERSION_STAGE, AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import (
    BATCH_LIMIT,
    PRIORITY_THREADS,
    BatchRefused,
    FetchedSecret,
    SecretsPort,
)

logger = logging.getLogger(__name__)

#: What is read: (secret ARN, versionId, versionStage, the role read as: None for the workload identity).
ReadKey: TypeAlias = tuple[str, str | None, str | None, AssumedRole | None]
#: Reads batched together: same region, same role.
BatchKey: TypeAlias = tuple[str, AssumedRole | None]
#: Who we are (the caller identity) and what AWS returned.
ReadResult: TypeAlias = tuple[str, FetchedSecret]
#: After the batch action was denied, how long reads stay single before a batch is tried again.
BATCH_RETRY_AFTER = 3600.0


def batchable(version_id: str | None, stage: str | None) -> bool:
    """Only the current version can be read in a batch (BatchGetSecretValue takes no selector)."""
    return version_id is None and stage in (None, DEFAULT_VERSION_STAGE)


@dataclass(eq=False)
class _Pending:
    key: ReadKey
    arn: SecretArn
    future: asyncio.Future[ReadResult]
    deadline: float
    started: bool = False
    started_at: float = 0.0
    #: Queued for a batch (else for a single call).
    batched: bool = True
    seq: int = 0

    @property
    def version_id(self) -> str | None:
        return self.key[1]

    @property
    def stage(self) -> str | None:
        return self.key[2]

    @property
    def role(self) -> AssumedRole | None:
        return self.key[3]

    @property
    def batch_key(self) -> BatchKey:
        return (self.arn.region, self.key[3])


@dataclass
class _Region:
    """The reads of one region and role waiting for a batch, oldest first, and their deadlines."""

    waiting: dict[ReadKey, _Pending] = field(default_factory=dict)
    deadlines: list[tuple[float, int, ReadKey]] = field(default_factory=list)

    def earliest(self) -> float | None:
        while self.deadlines:
            deadline, seq, key = self.deadlines[0]
            pending = self.waiting.get(key)
            if pending is not None and pending.seq == seq:
                return deadline
            heapq.heappop(self.deadlines)  # already left (in a batch, or on the priority lane)
        return None


@dataclass
class ReadCounts:
    """Calls made, by kind (for logs, tests and the benchmarks)."""

    single: int = 0
    batch: int = 0
    batched_secrets: int = 0
    priority: int = 0


class SecretReader:
    """Queues, batches and shares reads; see the module docstring."""

    def __init__(
        self, port: SecretsPort, *, max_workers: int, batch: bool = True, clock: Callable[[], float] | None = None
    ) -> None:
        self._port = port
        self._batch = batch
        self._slots = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="aws")
        self._priority_executor = ThreadPoolExecutor(max_workers=PRIORITY_THREADS, thread_name_prefix="aws-now")
        self._running = 0
        self._pending: dict[ReadKey, _Pending] = {}
        self._regions: dict[BatchKey, _Region] = {}
        self._singles: deque[_Pending] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count(1)
        self._batch_refused_until: float | None = None
        self._clock = clock
        self._closed = False
        self.counts = ReadCounts()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # --- asking ------------------------------------------------------------------------

    async def read(
        self,
        arn: SecretArn,
        version_id: str | None,
        stage: str | None,
        *,
        window: float,
        role: AssumedRole | None = None,
    ) -> ReadResult:
        """Read this secret version (as ``role``), sharing a read of it that is queued or running.

        ``window`` bounds how long a batchable read may wait for others to join its batch.
        Raises :class:`AwsFailure`.
        """
        key: ReadKey = (arn.arn, version_id, stage, role)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._enqueue(key, arn, window)
        return await asyncio.shield(pending.future)

    async def read_now(
        self,
        arn: SecretArn,
        version_id: str | None,
        stage: str | None,
        *,
        not_before: float | None = None,
        role: AssumedRole | None = None,
    ) -> ReadResult:
        """A read someone is waiting for: it leaves at once on the priority lane, or joins one
        that is running, unless that one started before ``not_before`` (loop time)."""
        key: ReadKey = (arn.arn, version_id, stage, role)
        pending = self._pending.get(key)
        if pending is not None and not_before is not None and pending.started and pending.started_at < not_before:
            pending = None  # it answers an older question: this caller wants a read that starts now
        if pending is None:
            pending = self._enqueue(key, arn, 0.0, start=False)
        if not pending.started:
            self._leave_queue(pending)
            self._start([pending], priority=True)
        return await asyncio.shield(pending.future)

    def expedite(
        self, arn: SecretArn, version_id: str | None, stage: str | None, *, role: AssumedRole | None = None
    ) -> None:
        """Move a queued read of this key to the priority lane (no-op if it is running or unknown)."""
        pending = self._pending.get((arn.arn, version_id, stage, role))
        if pending is not None and not pending.started:
            self._leave_queue(pending)
            self._start([pending], priority=True)

    def _enqueue(self, key: ReadKey, arn: SecretArn, window: float, *, start: bool = True) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = _Pending(key, arn, loop.create_future(), self._now() + max(0.0, window), seq=next(self._seq))
        self._pending[key] = pending
        if not start:
            return pending
        if self._batch and batchable(key[1], key[2]) and not self._batch_refused():
            region = self._regions.setdefault(pending.batch_key, _Region())
            region.waiting[key] = pending
            heapq.heappush(region.deadlines, (pending.deadline, pending.seq, key))
        else:
            pending.batched = False
            self._singles.append(pending)
        self._pump()
        return pending

    def _leave_queue(self, pending: _Pending) -> None:
        region = self._regions.get(pending.batch_key)
        if region is not None and region.waiting.get(pending.key) is pending:
            del region.waiting[pending.key]
        elif not pending.batched:
            try:
                self._singles.remove(pending)
            except ValueError:
                pass

    def _batch_refused(self) -> bool:
        until = self._batch_refused_until
        if until is None:
            return False
        if self._now() < until:
            return True
        self._batch_refused_until = None
        return False

    # --- dispatching -------------------------------------------------------------------

    def _pump(self) -> None:
        """Start what may start: singles in order, then full or due batches, within the slots."""
        if self._closed:
            return
        now = self._now()
        while self._running < self._slots and self._singles:
            self._start([self._singles.popleft()], priority=False)
        wake: float | None = None
        for region in self._regions.values():
            while self._running < self._slots and region.waiting:
                earliest = region.earliest()
                if len(region.waiting) < BATCH_LIMIT and earliest is not None and earliest > now:
                    wake = earliest if wake is None else min(wake, earliest)
                    break
                batch = list(itertools.islice(region.waiting.values(), BATCH_LIMIT))
                for pending in batch:
                    del region.waiting[pending.key]
                self._start(batch, priority=False)
        for name in [name for name, region in self._regions.items() if not region.waiting]:
            del self._regions[name]
        self._arm(wake)

    def _arm(self, wake: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, wake - self._now()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _start(self, batch: list[_Pending], *, priority: bool) -> None:
        loop = asyncio.get_running_loop()
        now = self._now()
        for pending in batch:
            pending.started, pending.started_at = True, now
        if priority:
            self.counts.priority += 1
        else:
            self._running += 1
        executor = self._priority_executor if priority else self._executor
        job: asyncio.Future[object]
        if len(batch) == 1 and (priority or not batch[0].batched):
            self.counts.single += 1
            job = loop.run_in_executor(executor, self._read_one, batch[0])
        else:
            self.counts.batch += 1
            self.counts.batched_secrets += len(batch)
            job = loop.run_in_executor(executor, self._read_batch, batch)
        job.add_done_callback(lambda done: self._finished(batch, done, priority=priority))

    def _finished(self, batch: list[_Pending], done: asyncio.Future[object], *, priority: bool) -> None:
        if not priority:
            self._running -= 1
        if self._closed:
            return  # close() cancelled every waiter already
        if done.cancelled():
            for pending in batch:
                self._settle(pending, asyncio.CancelledError())
        else:
            error = done.exception()
            if isinstance(error, BatchRefused):
                self._refused(batch, str(error))
            elif error is not None:
                for pending in batch:
                    self._settle(pending, error)
            else:
                self._deliver(batch, done.result())
        self._pump()

    def _deliver(self, batch: list[_Pending], result: object) -> None:
        if isinstance(result, tuple):  # a single read's (identity, fetched)
            self._settle(batch[0], result)
            return
        assert isinstance(result, _BatchAnswer)
        for pending in batch:
            answer = result.found.get(pending.arn.arn)
            if answer is None:
                # AWS said nothing about it (an ARN that names it differently): read it alone.
                pending.started, pending.batched = False, False
                self._singles.append(pending)
            elif isinstance(answer, AwsFailure):
                self._settle(pending, answer)
            else:
                self._settle(pending, (result.identity, answer))

    def _refused(self, batch: list[_Pending], said: str) -> None:
        if not self._batch_refused():  # batches in flight together are refused together: say it once
            self._batch_refused_until = self._now() + BATCH_RETRY_AFTER
            self._say_refused(said)
        for pending in batch:
            pending.started, pending.batched = False, False
            self._singles.append(pending)
        for region in self._regions.values():  # what waits for a batch now goes alone too
            for pending in region.waiting.values():
                pending.batched = False
                self._singles.append(pending)
            region.waiting.clear()

    @staticmethod
    def _say_refused(said: str) -> None:
        logger.warning(
            "IAM denies secretsmanager:BatchGetSecretValue (%s); reading one secret per call instead, and trying "
            'a batch again in %d minutes. Allow the action on "*" to save calls (see docs/install-eks.md).',
            said or "AccessDenied",
            BATCH_RETRY_AFTER // 60,
        )

    def _settle(self, pending: _Pending, outcome: ReadResult | BaseException) -> None:
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
        if pending.future.done():
            return
        if isinstance(outcome, asyncio.CancelledError):
            pending.future.cancel()
        elif isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
            pending.future.exception()  # retrieved: every waiter re-raises it, nobody else must
        else:
            pending.future.set_result(outcome)

    # --- in worker threads -------------------------------------------------------------

    def _read_one(self, pending: _Pending) -> ReadResult:
        role = pending.role
        identity = self._port.caller_identity(pending.arn.region, role=role)
        fetched = self._port.get_secret(
            pending.arn, version_id=pending.version_id, version_stage=pending.stage, role=role
        )
        return identity, fetched

    def _read_batch(self, batch: Sequence[_Pending]) -> _BatchAnswer:
        region, role = batch[0].batch_key
        identity = self._port.caller_identity(region, role=role)
        found = self._port.get_current_secrets(region, [pending.arn for pending in batch], role=role)
        return _BatchAnswer(identity, found)

    # --- the end -----------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()
        self._regions.clear()
        self._singles.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._priority_executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class _BatchAnswer:
    identity: str
    found: dict[str, FetchedSecret | AwsFailure]
