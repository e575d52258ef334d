"""What the redacting log filter costs per record with 1,000 and 10,000 values held, what a change of
value costs the redaction index, and what a first pass (N values held one at a time, a log line
after each) costs it.

Run with ``make bench`` (or ``.venv/bin/python bench/redact_bench.py``). Per record, it times the
filter the operator installs (``connector_credentials.cli.logs.RedactingFilter`` over the engine's
``NeedleIndex``: an immutable snapshot, replaced on every change) on typical records, against a
baseline measured in the same run: the same records through a filter that only formats the message.
In the same run, taking turns with it, it times the forms the index had before: the incremental
index (``IncrementalIndex`` below: tables changed in place one key at a time and read without a lock),
the index rebuilt whole when the values changed (``Redactor``), and, at 1,000 values, the first
filter (a substring search per value, its needles rebuilt for every record). Per record: the median
of every record timed alone (p50), over several repeats.

Per change, it times one more value held (``add``), and rebuilding the whole snapshot. Per first pass,
it times N values added one at a time with a log record after each (as the engine logs each first
verdict): the live index (changes kept in a small table, the whole rebuilt every ``MERGE_AFTER``),
the incremental index, and the simple form taken literally (the whole snapshot rebuilt at the first
record after each change), which costs O(N²) and is timed at 1,000 and 3,000 values only.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from connector_credentials.api.values import (  # noqa: E402
    MASK,
    MERGE_AFTER,
    MIN_NEEDLE,
    NeedleIndex,
    SecretValue,
    _forms,
)
from connector_credentials.cli.logs import RedactingFilter  # noqa: E402

HELD = (1000, 10_000)
#: ...and a row of 10,000 values of 200 characters (the scale benchmark's secrets): longer than most lines.
LONG = 10_000
RECORDS = 2000
REPEATS = 7
#: One more value timed this many times at each size (then discarded again).
ADDS = 201
#: Values held one at a time (first pass), for the live and the incremental index...
FIRST_PASS = (1000, 10_000)
#: ...and for the whole snapshot rebuilt after each change (O(N²): kept small).
FIRST_PASS_WHOLE = (1000, 3000)


def token() -> SecretValue:
    return SecretValue(f"xoxb-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}")  # ~45 chars, a shared prefix


def long_value() -> SecretValue:
    return SecretValue(secrets.token_hex(100))  # 200 characters, as bench/scale.py creates them


LINES = [
    (
        "%s/%s: %s: %s",
        (
            "xpander",
            "slack",
            "AccessVerified",
            "Read arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf (stage "
            "AWSCURRENT); re-checked every 5m.",
        ),
    ),
    ("Serving credentials on %s (mode %04o, allowed uids %s).", ("/var/run/c.sock", 0o660, "1000")),
    ("Writing the status of %s/%s failed (%s); retrying in %.1fs.", ("xpander", "jira", "HTTP 503", 2.0)),
    ("Handler 'watch' succeeded.", ()),
]


def records(count: int = RECORDS) -> list[logging.LogRecord]:
    made = []
    for index in range(count):
        msg, args = LINES[index % len(LINES)]
        made.append(logging.LogRecord("bench", logging.INFO, __file__, 1, msg, args, None))
    return made


# --- the forms before, for comparison ------------------------------------------------------------------


class IncrementalIndex:
    """The previous NeedleIndex: tables changed in place, one key at a time, read without a lock."""

    def __init__(self, values: Iterable[SecretValue] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[SecretValue, int] = {}
        self._needles: dict[str, int] = {}
        self._lengths: dict[str, tuple[int, ...]] = {}
        self._per_length: dict[tuple[str, int], int] = {}
        for value in values:
            self.add(value)

    def add(self, value: SecretValue) -> None:
        with self._lock:
            holders = self._values.get(value, 0)
            self._values[value] = holders + 1
            if holders:
                return
            for needle in _forms(value):
                sources = self._needles.get(needle, 0)
                self._needles[needle] = sources + 1
                if not sources:
                    prefix, size = needle[:MIN_NEEDLE], len(needle)
                    count = self._per_length.get((prefix, size), 0)
                    self._per_length[prefix, size] = count + 1
                    if not count:
                        self._lengths[prefix] = tuple(sorted((*self._lengths.get(prefix, ()), size), reverse=True))

    def discard(self, value: SecretValue) -> None:
        with self._lock:
            holders = self._values.get(value, 0)
            if holders > 1:
                self._values[value] = holders - 1
                return
            if not holders:
                return
            del self._values[value]
            for needle in _forms(value):
                sources = self._needles[needle] - 1
                if sources:
                    self._needles[needle] = sources
                    continue
                del self._needles[needle]
                prefix, size = needle[:MIN_NEEDLE], len(needle)
                count = self._per_length.pop((prefix, size)) - 1
                if count:
                    self._per_length[prefix, size] = count
                    continue
                lengths = tuple(n for n in self._lengths[prefix] if n != size)
                if lengths:
                    self._lengths[prefix] = lengths
                else:
                    del self._lengths[prefix]

    def __len__(self) -> int:
        return len(self._needles)

    def redact(self, text: str) -> str:
        lengths_of, needles = self._lengths, self._needles
        if not lengths_of or len(text) < MIN_NEEDLE:
            return text
        get = lengths_of.get
        parts: list[str] = []
        start = 0
        for i in range(len(text) - MIN_NEEDLE + 1):
            if i < start:
                continue
            lengths = get(text[i : i + MIN_NEEDLE])
            if lengths is None:
                continue
            for size in lengths:
                piece = text[i : i + size]
                if piece in needles:
                    parts += (text[start:i], MASK)
                    start = i + len(piece)
                    break
        if not parts:
            return text
        parts.append(text[start:])
        return "".join(parts)


def needles_of(values: Iterable[SecretValue]) -> tuple[str, ...]:
    """Every form of every value: what the engine rebuilt after each change of value (two forms back)."""
    return tuple({needle for value in values for needle in value.needles()})


class Redactor:
    """The index two forms back: needles by their first 4 characters, longest first, built whole."""

    def __init__(self, needles: Iterable[str]) -> None:
        by_prefix: dict[str, list[str]] = {}
        for needle in sorted({n for n in needles if len(n) >= MIN_NEEDLE}, key=len, reverse=True):
            by_prefix.setdefault(needle[:MIN_NEEDLE], []).append(needle)
        self._by_prefix = by_prefix

    def __len__(self) -> int:
        return len(self._by_prefix)

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


def filtering(index: object) -> Callable[[logging.LogRecord], bool]:
    """The operator's filter over any of the indexes (it only calls ``bool()`` and ``redact``)."""
    return RedactingFilter(index).filter  # type: ignore[arg-type]


# --- timing -------------------------------------------------------------------------------------------------


Filter = Callable[[logging.LogRecord], bool]


def per_record(filters: dict[str, Filter], batch: list[logging.LogRecord], repeats: int) -> dict[str, float]:
    """p50 µs per record of each filter, every record timed alone; the filters take turns in each repeat."""
    samples: dict[str, list[float]] = {name: [] for name in filters}
    clock = time.perf_counter_ns
    for _ in range(repeats):
        for name, filter_ in filters.items():
            fresh = [logging.LogRecord(r.name, r.levelno, r.pathname, r.lineno, r.msg, r.args, None) for r in batch]
            times = samples[name]
            for record in fresh:
                began = clock()
                filter_(record)
                times.append((clock() - began) / 1000)
    return {name: statistics.median(times) for name, times in samples.items()}


def change_costs(held: int) -> dict[str, float]:
    """Median µs of one more value held (then dropped again) and of rebuilding the whole snapshot."""
    values = [token() for _ in range(held)]
    live, incremental = NeedleIndex(values), IncrementalIndex(values)
    adds: dict[str, list[float]] = {"live": [], "incremental": []}
    for _ in range(ADDS):
        value = token()
        for name, index in (("live", live), ("incremental", incremental)):
            began = time.perf_counter()
            index.add(value)
            adds[name].append((time.perf_counter() - began) * 1e6)
            index.discard(value)
        live._settled()  # each sample starts from a settled index
    rebuilds = []
    for _ in range(REPEATS):
        live.add(token())
        began = time.perf_counter()
        live._settled()
        rebuilds.append((time.perf_counter() - began) * 1e6)
    before = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        Redactor(needles_of(values))
        before.append((time.perf_counter() - began) * 1e6)
    return {
        "add": statistics.median(adds["live"]),
        "add_incremental": statistics.median(adds["incremental"]),
        "rebuild": statistics.median(rebuilds),
        "rebuild_redactor": statistics.median(before),
    }


def first_pass(count: int, kind: str) -> float:
    """Seconds for ``count`` values added one at a time, each followed by one record through the filter."""
    values = [token() for _ in range(count)]
    index: NeedleIndex | IncrementalIndex = IncrementalIndex() if kind == "incremental" else NeedleIndex()
    log_filter = filtering(index)
    msg, args = LINES[0]
    made = [logging.LogRecord("bench", logging.INFO, __file__, 1, msg, args, None) for _ in values]
    whole = kind == "whole"
    began = time.perf_counter()
    for value, record in zip(values, made, strict=True):
        index.add(value)
        if whole:
            index._settled()  # type: ignore[union-attr]
        log_filter(record)
    return time.perf_counter() - began


def records_only(count: int) -> float:
    """The same records through the filter over an index that holds ``count`` values from the start."""
    log_filter = filtering(NeedleIndex(token() for _ in range(count)))
    msg, args = LINES[0]
    made = [logging.LogRecord("bench", logging.INFO, __file__, 1, msg, args, None) for _ in range(count)]
    began = time.perf_counter()
    for record in made:
        log_filter(record)
    return time.perf_counter() - began


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    batch = records()
    print(f"Redacting log filter: p50 µs per record, {RECORDS} typical records timed alone, {args.repeats} repeats")
    print(f"(live, changes pending: {MERGE_AFTER - 1} values added since the index was last rebuilt whole)")
    print()
    print(
        "| values held | baseline (getMessage) | live index | live, changes pending | previous: incremental "
        "| rebuilt whole on change (two back) | first: a search per value |"
    )
    print("|---|---|---|---|---|---|---|")
    leaking: dict[int, dict[str, float]] = {}
    for held, make in (*((held, token) for held in HELD), (LONG, long_value)):
        values = [make() for _ in range(held)]
        live = NeedleIndex(values)
        pending = NeedleIndex(values)
        for _ in range(MERGE_AFTER - 1):
            pending.add(make())
        assert pending._snapshot.recent.needles, "the changes were built in: the row would not say what it says"
        filters: dict[str, Filter] = {
            "baseline": lambda record: bool(record.getMessage()),
            "live": filtering(live),
            "pending": filtering(pending),
            "incremental": filtering(IncrementalIndex(values)),
            "whole": filtering(Redactor(needles_of(values))),
        }
        typical = per_record(filters, batch, args.repeats)
        search = "—"
        if held <= 1000:
            search = f"{per_record({'search': search_filter(values)}, batch[:200], 1)['search']:,.0f}"
        label = f"{held:,}" if make is token else f"{held:,} of 200 characters"
        print(
            f"| {label} | {typical['baseline']:.1f} | {typical['live']:.1f} | {typical['pending']:.1f} "
            f"| {typical['incremental']:.1f} | {typical['whole']:.1f} | {search} |"
        )
        leak = logging.LogRecord("bench", logging.INFO, __file__, 1, "token %s", (values[held // 2].reveal(),), None)
        filters["live"](leak)
        assert values[held // 2].reveal() not in leak.getMessage(), "the filter missed a value"
        if make is not token:
            continue
        leaks = [
            logging.LogRecord("bench", logging.INFO, __file__, 1, "Read token %s for %s", (v.reveal(), "x/y"), None)
            for v in values[:: max(1, held // 100)]
        ]
        leaking[held] = per_record(
            {"live": filters["live"], "incremental": filters["incremental"], "whole": filters["whole"]},
            leaks * max(1, RECORDS // len(leaks)),
            args.repeats,
        )
    print()
    for held, found in leaking.items():
        print(
            f"A record that contains a held value ({held:,} held, all sharing the prefix xoxb): live "
            f"{found['live']:.1f} µs, incremental {found['incremental']:.1f} µs, rebuilt whole {found['whole']:.1f} µs."
        )
    print()
    print(f"A change of value (add: median of {ADDS}; whole rebuild: median of {args.repeats})")
    print()
    print(
        "| values held | live: add (recent table) | live: whole snapshot rebuilt | previous: incremental add "
        "| two back: Redactor rebuilt |"
    )
    print("|---|---|---|---|---|")
    for held in HELD:
        cost = change_costs(held)
        print(
            f"| {held:,} | {cost['add']:.1f} µs | {cost['rebuild'] / 1000:.2f} ms | {cost['add_incremental']:.1f} µs "
            f"| {cost['rebuild_redactor'] / 1000:.2f} ms |"
        )
    print()
    print("A first pass: N values held one at a time, one log record after each (the records alone: last column)")
    print()
    print("| N | live index | previous: incremental | whole snapshot rebuilt after each change | records alone |")
    print("|---|---|---|---|---|")
    for count in sorted({*FIRST_PASS, *FIRST_PASS_WHOLE}):
        live = f"{first_pass(count, 'live') * 1000:,.0f} ms" if count in FIRST_PASS else "—"
        incremental = f"{first_pass(count, 'incremental') * 1000:,.0f} ms" if count in FIRST_PASS else "—"
        whole = f"{first_pass(count, 'whole') * 1000:,.0f} ms" if count in FIRST_PASS_WHOLE else "—"
        print(f"| {count:,} | {live} | {incremental} | {whole} | {records_only(count) * 1000:,.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
