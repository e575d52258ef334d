"""Whose turn it is to be written: credentials queue for a few workers, not a task each.

The status writer (:mod:`connector_credentials.core.status`) decides what each credential needs
written and makes one attempt at a time; this module decides when and by whom. A credential due
for a write waits in the queue of its lane (status writes or Events) until one of that lane's
workers takes it (:data:`WORKERS`: as many as the Kubernetes sink has slots); one waiting for a
retry is an item in a heap of deadlines, with one loop timer for the earliest. Its place is two
fields of its slotted :class:`~connector_credentials.core.status.Reporting` record.

Before, each credential with something to write had a task of its own, waiting in the API client
for a slot or sleeping out a retry: about 2.4 KiB each, 7,000 at once at 10,000 credentials after
the first pass (issue #17). Now the tasks are the workers, however many credentials wait.

One attempt at a time per credential: it is in at most one queue, or in flight, or waiting for its
retry. So an Event never overtakes the status write queued before it, and a newer verdict, queued
while a write is in flight, is written once that write's answer is in.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from connector_credentials.core.supervise import log_bug, supervise

if TYPE_CHECKING:
    from connector_credentials.core.entry import Entry

logger = logging.getLogger("connector_credentials.core.engine")


class Lane(enum.Enum):
    """What is written: a status patch or an Event (the value is how the log names it)."""

    STATUS = "status"
    EVENT = "Event"


#: Workers per lane: the Kubernetes sink's slots (8 status writes and reads, 2 Events). More would
#: only wait in the sink; fewer would leave its slots idle.
WORKERS = {Lane.STATUS: 8, Lane.EVENT: 2}


class Turn(enum.Enum):
    """Where a credential is in the queue."""

    IDLE = "idle"  # nothing to write
    QUEUED = "queued"  # in its lane's queue, waiting for a worker
    WRITING = "writing"  # a worker is making an attempt
    RETRY = "retry"  # waiting for a retry (an item in the deadline heap)
    DROPPED = "dropped"  # forgotten, or the writer stopped: nothing more is written


#: What a credential needs written next and from when (loop time), ``None`` if nothing; asked
#: with the loop time now.
Wanted = Callable[["Entry", float], "tuple[Lane, float] | None"]
#: One attempt at ``lane`` for a credential; it handles its own failures (none may escape).
Attempt = Callable[["Entry", Lane], Awaitable[None]]


class StatusQueue:
    """The queues, workers and retry timer of one status writer."""

    def __init__(self, wanted: Wanted, attempt: Attempt) -> None:
        self._wanted = wanted
        self._attempt = attempt
        self._queues: dict[Lane, asyncio.Queue[Entry]] = {}
        self._workers: list[asyncio.Task[None]] = []
        #: (due, tie-breaker, entry) for each credential waiting for a retry. An item is current
        #: while its credential waits (Turn.RETRY) for this very due time; others are skipped.
        self._retries: list[tuple[float, int, Entry]] = []
        self._order = itertools.count()
        self._compact_at = 256
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._finished: asyncio.Future[None] | None = None
        self._stopped = False

    # --- the writer's calls ---------------------------------------------------------------

    def wake(self, entry: Entry) -> None:
        """The credential may have something (else) to write: queue it if it is due now, else wait
        for its retry. A credential queued or in flight is looked at again when its worker has it."""
        self._place(entry, asyncio.get_running_loop().time())

    def written(self, entry: Entry) -> asyncio.Future[None]:
        """A future done once nothing is left to write for the credential: all accepted, or never
        to be (forgotten, or the writer stopped). Made only for a caller who waits; while nothing
        is pending, one shared future that is already done."""
        state = entry.reporting
        if not state.writing:
            return self._done()
        if state.waiter is None:
            state.waiter = asyncio.get_running_loop().create_future()
        return state.waiter

    def drop(self, entry: Entry) -> None:
        """Nothing more is written for the credential (it is forgotten). A write in flight ends with
        its one request (already sent: cancelling it would not take it back), and the worker then
        leaves the credential: none of its requests can reach a successor under the same name."""
        self._settle(entry, Turn.DROPPED)

    async def stop(self, entries: Iterable[Entry]) -> None:
        """Stop writing for good: the workers are cancelled (a request in flight with them), the
        retry timer too, and whoever waits for one of ``entries`` is told. Nothing runs after."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._retries.clear()
        for entry in entries:
            self.drop(entry)
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._queues.clear()

    # --- placing a credential -------------------------------------------------------------

    def _place(self, entry: Entry, now: float) -> None:
        state = entry.reporting
        if self._stopped or state.turn in (Turn.QUEUED, Turn.WRITING, Turn.DROPPED):
            return
        wanted = self._wanted(entry, now)
        if wanted is None:
            self._settle(entry, Turn.IDLE)
            return
        lane, due = wanted
        if due <= now:
            state.turn = Turn.QUEUED
            self._queue(lane).put_nowait(entry)
            return
        if state.turn is Turn.RETRY and state.retry_at == due:
            return  # its item is in the heap already
        state.turn, state.retry_at = Turn.RETRY, due
        heapq.heappush(self._retries, (due, next(self._order), entry))
        if len(self._retries) > self._compact_at:
            # Items left behind by credentials queued early (a newer verdict) or forgotten.
            self._retries = [item for item in self._retries if _current(item)]
            heapq.heapify(self._retries)
            self._compact_at = max(256, 2 * len(self._retries))
        self._arm()

    @staticmethod
    def _settle(entry: Entry, turn: Turn) -> None:
        """The credential leaves the queue (idle, or dropped for good); its waiter, if any, is told."""
        state = entry.reporting
        state.turn = turn
        if state.waiter is not None:
            if not state.waiter.done():
                state.waiter.set_result(None)
            state.waiter = None

    def _done(self) -> asyncio.Future[None]:
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
            self._finished.set_result(None)
        return self._finished

    # --- retries -----------------------------------------------------------------------------

    def _arm(self) -> None:
        """One timer, for the earliest retry."""
        first = self._retries[0][0]
        if self._timer is not None and self._timer_at <= first:
            return  # it fires first, and arms the next
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = asyncio.get_running_loop().call_at(first, self._retry_due), first

    def _retry_due(self) -> None:
        # A loop callback: a bug here is logged, not raised into the loop's exception handler, and
        # the timer is armed again for the retries after it.
        fired_at, self._timer, self._timer_at = self._timer_at, None, float("inf")
        # The loop may call a timer a hair before its time (its clock's resolution): it counts as due.
        now = max(asyncio.get_running_loop().time(), fired_at)
        try:
            while self._retries and self._retries[0][0] <= now:
                item = heapq.heappop(self._retries)
                if _current(item):
                    entry = item[2]
                    entry.reporting.turn = Turn.IDLE
                    self._place(entry, now)
        except Exception as exc:  # noqa: BLE001 - see above; the credential is placed again by its next report
            log_bug(logger, "Retrying status writes", exc)
        if self._retries and not self._stopped:
            self._arm()

    # --- the workers -------------------------------------------------------------------------

    def _queue(self, lane: Lane) -> asyncio.Queue[Entry]:
        """The lane's queue; the workers start with the first credential queued (on the running loop)."""
        if not self._workers:
            self._start()
        return self._queues[lane]

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for lane, count in WORKERS.items():
            self._queues[lane] = asyncio.Queue()
            for number in range(count):
                what = f"The {lane.value} writer {number}"
                self._workers.append(
                    loop.create_task(
                        supervise(what, functools.partial(self._work, lane), log=logger),
                        name=f"ccred-{lane.name.lower()}-writer-{number}",
                        # Empty: a task keeps the context it starts in (kopf's holds the event being handled).
                        context=contextvars.Context(),
                    )
                )

    async def _work(self, lane: Lane) -> None:
        """Take the credentials queued in ``lane``, one attempt each, and place each one again after."""
        queue, loop = self._queues[lane], asyncio.get_running_loop()
        while True:
            entry = await queue.get()
            state = entry.reporting
            if state.turn is not Turn.QUEUED:
                continue  # dropped while it waited
            state.turn = Turn.IDLE
            now = loop.time()
            wanted = self._wanted(entry, now)
            if wanted is None or wanted[0] is not lane or wanted[1] > now:
                # What it needs changed while it waited (e.g. a newer verdict goes before its Event).
                self._place(entry, now)
                continue
            state.turn = Turn.WRITING
            try:
                await self._attempt(entry, lane)
            finally:
                if state.turn is Turn.WRITING:  # not dropped meanwhile (e.g. the object is gone)
                    state.turn = Turn.IDLE
            self._place(entry, loop.time())


def _current(item: tuple[float, int, Entry]) -> bool:
    state = item[2].reporting
    return state.turn is Turn.RETRY and state.retry_at == item[0]
