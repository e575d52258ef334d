"""What the redacting log filter costs per record with 1,000 values held, and what holding one
more value costs the redaction index at 1,000 and 10,000 values held.

Run with ``make bench`` (or ``.venv/bin/python bench/redact_bench.py``). Per record, it times the
filter the operator installs (``connector_credentials.cli.logs.RedactingFilter`` over the engine's live
``NeedleIndex``) on typical records, against a baseline measured in the same run: the same records
through a filter that does nothing. For comparison, in the same run, it times the two earlier
filters: the index rebuilt whole when the values changed (``Redactor``, below), and before it a
substring search per value with the needles rebuilt per record.

Per value, it times what the next log record paid when the engine held one more value: before, the
needles of every value held and the whole ``Redactor`` index were rebuilt; now one ``add`` to the
index. Figures are medians of several repeats.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from connector_credentials.api.values import MASK, MIN_NEEDLE, NeedleIndex, SecretValue  # noqa: E402
from connector_credentials.cli.logs import RedactingFilter  # noqa: E402

VALUES = 1000
RECORDS = 2000
REPEATS = 15
#: Held values at which one more value is timed, and how many values are timed at each.
HOLDING = (1000, 10_000)
ADDS = 201


def token() -> SecretValue:
    return SecretValue(f"xoxb-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}")  # ~45 chars, a shared prefix


def records() -> list[logging.LogRecord]:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf"
    lines = [
        (
            "%s/%s: %s: %s",
            ("xpander", "slack", "AccessVerified", f"Read {arn} (stage AWSCURRENT); re-checked every 5m."),
        ),
        ("Serving credentials on %s (mode %04o, allowed uids %s).", ("/var/run/c.sock", 0o660, "1000")),
        ("Writing the status of %s/%s failed (%s); retrying in %.1fs.", ("xpander", "jira", "HTTP 503", 2.0)),
        ("Handler 'watch' succeeded.", ()),
    ]
    made = []
    for index in range(RECORDS):
        msg, args = lines[index % len(lines)]
        made.append(logging.LogRecord("bench", logging.INFO, __file__, 1, msg, args, None))
    return made


# --- the filters as they were, for comparison -------------------------------------------------------


def needles_of(values: Iterable[SecretValue]) -> tuple[str, ...]:
    """Every form of every value: what the engine rebuilt after each change of value."""
    return tuple({needle for value in values for needle in value.needles()})


class Redactor:
    """The previous index: needles by their first 4 characters, longest first, built whole."""

    def __init__(self, needles: Iterable[str]) -> None:
        by_prefix: dict[str, list[str]] = {}
        for needle in sorted({n for n in needles if len(n) >= MIN_NEEDLE}, key=len, reverse=True):
            by_prefix.setdefault(needle[:MIN_NEEDLE], []).append(needle)
        self._by_prefix = by_prefix

    def redact(self, text: str) -> str:
        by_prefix = self._by_prefix
        if not by_prefix or len(text) < MIN_NEEDLE:
            return text
        parts: list[str] = []
        start = i = 0
        last = len(text) - MIN_NEEDLE
        while i <= last:
            candidates = by_prefix.get(text[i : i + MIN_NEEDLE])
            if candidates is not None:
                needle = next((n for n in candidates if text.startswith(n, i)), None)
                if needle is not None:
                    parts += (text[start:i], MASK)
                    i = start = i + len(needle)
                    continue
            i += 1
        if not parts:
            return text
        parts.append(text[start:])
        return "".join(parts)


class PreviousFilter(logging.Filter):
    """The previous filter's per-record path: the engine's cached tuple compared, then its index used."""

    def __init__(self, needles: Callable[[], tuple[str, ...]]) -> None:
        super().__init__("redact")
        self._needles = needles
        self._source: tuple[str, ...] | None = None
        self._redactor = Redactor(())

    def filter(self, record: logging.LogRecord) -> bool:
        needles = self._needles()
        if needles is not self._source:
            self._source, self._redactor = needles, Redactor(needles)
        redactor = self._redactor
        if not redactor._by_prefix:
            return True
        message = record.getMessage()
        redacted = redactor.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redactor.redact(text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        return True


class CachedNeedles:
    """``Engine.needles()`` as it was: the tuple of every needle, rebuilt only after a change."""

    def __init__(self, values: list[SecretValue]) -> None:
        self._values = values
        self._needles: tuple[str, ...] | None = None

    def needles(self) -> tuple[str, ...]:
        if self._needles is None:
            self._needles = needles_of(self._values)
        return self._needles


def search_filter(values: list[SecretValue]) -> Callable[[logging.LogRecord], bool]:
    """The first filter: needles rebuilt for every record, one substring search per needle."""

    def run(record: logging.LogRecord) -> bool:
        needles = [n for value in values for n in value.needles() if len(n) >= MIN_NEEDLE]
        message = record.getMessage()
        for needle in needles:
            if needle in message:
                message = message.replace(needle, MASK)
        return True

    return run


# --- timing -------------------------------------------------------------------------------------------


Filter = Callable[[logging.LogRecord], bool]


def per_record(filters: dict[str, Filter], batch: list[logging.LogRecord]) -> dict[str, float]:
    """Median µs per record of each filter; the filters take turns within each repeat (same conditions)."""
    samples: dict[str, list[float]] = {name: [] for name in filters}
    for _ in range(REPEATS):
        for name, filter_ in filters.items():
            fresh = [logging.LogRecord(r.name, r.levelno, r.pathname, r.lineno, r.msg, r.args, None) for r in batch]
            began = time.perf_counter()
            for record in fresh:
                filter_(record)
            samples[name].append((time.perf_counter() - began) / len(fresh) * 1e6)
    return {name: statistics.median(times) for name, times in samples.items()}


def one_more_value(held: int) -> tuple[float, float]:
    """Median µs to take one more value into account: (full rebuild as before, incremental add)."""
    values = [token() for _ in range(held)]
    rebuilds = []
    for _ in range(REPEATS):
        values.append(token())
        began = time.perf_counter()
        Redactor(needles_of(values))
        rebuilds.append((time.perf_counter() - began) * 1e6)
        values.pop()
    index = NeedleIndex(values)
    adds = []
    for _ in range(ADDS):
        value = token()
        began = time.perf_counter()
        index.add(value)
        adds.append((time.perf_counter() - began) * 1e6)
        index.discard(value)  # back to ``held`` values for the next sample
    return statistics.median(rebuilds), statistics.median(adds)


def main() -> int:
    values = [token() for _ in range(VALUES)]
    batch = records()
    current = RedactingFilter(NeedleIndex(values))
    engine_ref = [CachedNeedles(values)]
    previous = PreviousFilter(lambda: engine_ref[0].needles() if engine_ref else ())
    typical = per_record(
        {
            "baseline": lambda record: bool(record.getMessage()),
            "live": current.filter,
            "previous": previous.filter,
        },
        batch,
    )
    search = per_record({"search": search_filter(values)}, batch[: RECORDS // 10])["search"]
    leaks = [
        logging.LogRecord("bench", logging.INFO, __file__, 1, "Read token %s for %s", (value.reveal(), "x/y"), None)
        for value in values[:: VALUES // 100]
    ]
    leaking = per_record({"live": current.filter, "previous": previous.filter}, leaks * (RECORDS // len(leaks)))
    leak = logging.LogRecord("bench", logging.INFO, __file__, 1, "token %s", (values[500].reveal(),), None)
    current.filter(leak)
    assert values[500].reveal() not in leak.getMessage(), "the filter missed a value"

    baseline, live, before = typical["baseline"], typical["live"], typical["previous"]
    print(f"Redacting log filter, {VALUES} values held, {RECORDS} typical records, median of {REPEATS}")
    print()
    print("| filter | µs per record | vs baseline |")
    print("|---|---|---|")
    print(f"| baseline (getMessage only) | {baseline:.1f} | 1.0x |")
    print(f"| RedactingFilter (live index, updated per value) | {live:.1f} | {live / baseline:.1f}x |")
    print(f"| previous: index rebuilt whole on a change | {before:.1f} | {before / baseline:.1f}x |")
    print(f"| first: a search per value, rebuilt per record | {search:.1f} | {search / baseline:.0f}x |")
    print()
    print(f"Cost of the filter itself: {live - baseline:.1f} µs per record (target: under 50 µs).")
    print(
        f"A record that contains a held value (all {VALUES} share the prefix xoxb): "
        f"{leaking['live']:.1f} µs now, {leaking['previous']:.1f} µs with the previous index."
    )
    print()
    print(f"Holding one more value (rebuild: median of {REPEATS}; add: median of {ADDS})")
    print()
    print("| values held | before: full rebuild | now: NeedleIndex.add | ratio |")
    print("|---|---|---|---|")
    for held in HOLDING:
        rebuild, add = one_more_value(held)
        print(f"| {held:,} | {rebuild / 1000:,.2f} ms | {add:.1f} µs | {rebuild / add:,.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
