"""When each credential is read next: jitter, backoff, and how early a read may leave to fill a batch.

A refresh is wanted at ``now + interval``, jittered by ``CCRED_JITTER`` so that replicas and
credentials do not all read at once. It is handed to the reader as a
:class:`Plan`: due at the jittered time, and free to leave
from the start of the jitter range, so that the reader's sweep can fill batches of twenty
from whatever is due in that range. A read never leaves before the range plain jitter would
have drawn it from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from connector_credentials.config.settings import OperatorSettings


def capped_doubling(base: float, cap: float, attempt: int) -> float:
    """``base`` doubled for each attempt after the first, at most ``cap``. The exponent is bounded
    before it is used: ``2.0 ** 1024`` raises OverflowError, which after about a thousand failures
    (days of an AWS outage) would kill the task that retries."""
    doublings = max(0, attempt - 1)
    if doublings > 64 or base * 2.0**doublings >= cap:
        return cap
    return base * 2.0**doublings


@dataclass(frozen=True, slots=True)
class Plan:
    """A read wanted by ``due`` that may leave from ``earliest`` to fill a batch."""

    due: float
    earliest: float


#: The batch window is at most this share of a credential's refreshInterval.
BATCH_WINDOW_SHARE = 0.02
#: A credential's first check waits at most this long for others to fill its batch.
FIRST_CHECK_WINDOW = 0.05


class Timing:
    """The engine's clock arithmetic: pure, given the loop time ``now``."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self._random = random.Random()  # noqa: S311 - jitter, not cryptography
        #: The jitter draw of the call whose answers are being applied (they arrive one after another).
        self._last_read: int | None = None
        self._last_draw = 0.0

    def jittered(self, seconds: float, draw: float | None = None) -> float:
        """``seconds`` ± ``CCRED_JITTER``; ``draw`` in [0, 1) picks where (random if not given)."""
        spread = seconds * self.settings.jitter
        return max(0.0, seconds - spread + (self._random.random() if draw is None else draw) * 2 * spread)

    def backoff(self, failures: int) -> float:
        ceiling = capped_doubling(self.settings.backoff_base, self.settings.backoff_cap, failures)
        # "Equal jitter": never below half the step, so retries cannot pile up at zero.
        return ceiling / 2 + self._random.random() * ceiling / 2

    def batch_window(self, interval: float, *, first: bool = False) -> float:
        """How long a due read may wait for others to fill its batch: short, and short against the interval."""
        if first:  # a first check waits only a moment (a burst of new objects, the listing at start)
            return min(self.settings.batch_window, FIRST_CHECK_WINDOW)
        return min(self.settings.batch_window, interval * BATCH_WINDOW_SHARE)

    def refresh(self, interval: float, now: float, *, read: int | None = None) -> Plan:
        """The next refresh: jittered, and free to leave early within the jitter range (or the batch
        window). The credentials one call answered (``read``: its number) share one jitter draw, so
        that they stay together: next time they leave in one call again, and batches stay full."""
        if read is None or read != self._last_read:
            self._last_read, self._last_draw = read, self._random.random()
        spread = max(interval * self.settings.jitter, self.batch_window(interval))
        due = now + self.jittered(interval, self._last_draw)
        return Plan(due=due, earliest=now + max(0.0, interval - spread))

    def first(self, now: float) -> Plan:
        """A first check: in a moment, with whatever else arrives meanwhile (the listing at start)."""
        return Plan(due=now + self.batch_window(0.0, first=True), earliest=now)

    def retry(self, at: float, interval: float) -> Plan:
        """A retry (after a failure, before a value grows too old): never before ``at``, batched
        with what else is due then."""
        return Plan(due=at + self.batch_window(interval), earliest=at)
