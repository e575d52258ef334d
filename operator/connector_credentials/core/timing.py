"""When each credential is checked next: jitter, backoff, batch windows, and refresh cohorts.

Refresh times are chosen so that credentials refresh together, twenty secrets per AWS call.

A refresh cycle costs ``ceil(N / 20)`` ``BatchGetSecretValue`` calls only if the secrets due
come in twenties. Independent jitter would spread N refreshes over the jitter range and
leave many batches half empty, so each credential's next refresh is *placed*: into a
*cohort* of its region (a due time shared by up to 20 secrets) that falls within the
credential's own jitter range, else into a new cohort at a random time in that range.
Credentials reading the same secret land in the same cohort when their ranges allow, and
so share one read. Placing never moves a refresh outside the range plain jitter would have
drawn it from.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from connector_credentials.api.models import ConnectorCredentialSpec
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.ports import BATCH_LIMIT
from connector_credentials.core.reads import BatchKey, ReadKey, batchable


def capped_doubling(base: float, cap: float, attempt: int) -> float:
    """``base`` doubled for each attempt after the first, at most ``cap``. The exponent is bounded
    before it is used: ``2.0 ** 1024`` raises OverflowError, which after about a thousand failures
    (days of an AWS outage) would kill the task that retries."""
    doublings = max(0, attempt - 1)
    if doublings > 64 or base * 2.0**doublings >= cap:
        return cap
    return base * 2.0**doublings


#: The batch window is at most this share of a credential's refreshInterval.
BATCH_WINDOW_SHARE = 0.02
#: A credential's first check waits at most this long for others to fill its batch.
FIRST_CHECK_WINDOW = 0.05


@dataclass
class _Cohort:
    due: float
    keys: set[ReadKey] = field(default_factory=set)


class Cohorts:
    """Per-region (and role) cohorts, sorted by due time; the past ones are dropped as time moves on."""

    def __init__(self, capacity: int = BATCH_LIMIT) -> None:
        self._capacity = capacity
        self._regions: dict[BatchKey, tuple[list[float], list[_Cohort]]] = {}

    def place(
        self, region: BatchKey, key: ReadKey, *, now: float, earliest: float, latest: float, preferred: float
    ) -> float:
        """The due time for ``key``'s next refresh, within ``[earliest, latest]``."""
        dues, cohorts = self._regions.setdefault(region, ([], []))
        past = bisect.bisect_right(dues, now)
        if past:  # those fired already (their members are placing themselves anew)
            del dues[:past], cohorts[:past]
        start, stop = bisect.bisect_left(dues, earliest), bisect.bisect_right(dues, latest)
        best: _Cohort | None = None
        for cohort in cohorts[start:stop]:
            if key in cohort.keys:
                return cohort.due  # another credential reads the same secret then: share its read
            if len(cohort.keys) < self._capacity and (
                best is None or abs(cohort.due - preferred) < abs(best.due - preferred)
            ):
                best = cohort
        if best is None:
            best = _Cohort(preferred)
            at = bisect.bisect_right(dues, preferred)
            dues.insert(at, preferred)
            cohorts.insert(at, best)
        best.keys.add(key)
        return best.due

    def __len__(self) -> int:
        return sum(len(cohorts) for _, cohorts in self._regions.values())


class Timing:
    """The engine's clock arithmetic: pure, given the loop time ``now``."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.cohorts = Cohorts()
        self._random = random.Random()  # noqa: S311 - jitter, not cryptography

    def jittered(self, seconds: float) -> float:
        spread = seconds * self.settings.jitter
        return max(0.0, seconds - spread + self._random.random() * 2 * spread)

    def backoff(self, failures: int) -> float:
        ceiling = capped_doubling(self.settings.backoff_base, self.settings.backoff_cap, failures)
        # "Equal jitter": never below half the step, so retries cannot pile up at zero.
        return ceiling / 2 + self._random.random() * ceiling / 2

    def batch_window(self, interval: float, *, first: bool = False) -> float:
        """How long a due read may wait for others to fill its batch: short, and short against the interval."""
        if first:  # a first check waits only a moment (a burst of new objects, the listing at start)
            return min(self.settings.batch_window, FIRST_CHECK_WINDOW)
        return min(self.settings.batch_window, interval * BATCH_WINDOW_SHARE)

    def next_due(self, spec: ConnectorCredentialSpec, interval: float, now: float) -> float:
        """The next refresh: in a cohort of up to 20 secrets of its region when it can be batched."""
        preferred = now + self.jittered(interval)
        if not (self.settings.batch_reads and batchable(spec.version_id, spec.effective_stage)):
            return preferred
        spread = max(interval * self.settings.jitter, self.batch_window(interval))
        return self.cohorts.place(
            (spec.arn.region, spec.role),
            (spec.arn.arn, spec.version_id, spec.effective_stage, spec.role),
            now=now,
            earliest=now + interval - spread,
            latest=now + interval + spread,
            preferred=preferred,
        )
