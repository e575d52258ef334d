"""Refresh times chosen so that credentials refresh together, twenty secrets per AWS call.

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
from dataclasses import dataclass, field

from connector_credentials.aws import BATCH_LIMIT
from connector_credentials.reads import ReadKey


@dataclass
class _Cohort:
    due: float
    keys: set[ReadKey] = field(default_factory=set)


class Cohorts:
    """Per-region cohorts, sorted by due time; the past ones are dropped as time moves on."""

    def __init__(self, capacity: int = BATCH_LIMIT) -> None:
        self._capacity = capacity
        self._regions: dict[str, tuple[list[float], list[_Cohort]]] = {}

    def place(
        self, region: str, key: ReadKey, *, now: float, earliest: float, latest: float, preferred: float
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
