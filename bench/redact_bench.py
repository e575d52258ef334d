"""What the redacting log filter costs per record, with 1,000 values held.

Run with ``make bench`` (or ``.venv/bin/python bench/redact_bench.py``). It times the filter the
operator installs (``connector_credentials.logs.RedactingFilter``) on typical records, against a
baseline measured in the same run: the same records through a filter that does nothing. It also
times the way the filter worked before (a substring search per value, needles rebuilt per record),
for comparison. Figures are medians of several repeats, in microseconds per record.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from connector_credentials.logs import MIN_NEEDLE, RedactingFilter  # noqa: E402
from connector_credentials.values import MASK, SecretValue, needles_of  # noqa: E402

VALUES = 1000
RECORDS = 2000
REPEATS = 7


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


def old_filter(values: list[SecretValue]) -> Callable[[logging.LogRecord], bool]:
    """The filter as it was: needles rebuilt for every record, one substring search per needle."""

    def run(record: logging.LogRecord) -> bool:
        needles = [n for value in values for n in value.needles() if len(n) >= MIN_NEEDLE]
        message = record.getMessage()
        for needle in needles:
            if needle in message:
                message = message.replace(needle, MASK)
        return True

    return run


def per_record(filter_: Callable[[logging.LogRecord], bool], batch: list[logging.LogRecord]) -> float:
    samples = []
    for _ in range(REPEATS):
        fresh = [logging.LogRecord(r.name, r.levelno, r.pathname, r.lineno, r.msg, r.args, None) for r in batch]
        began = time.perf_counter()
        for record in fresh:
            filter_(record)
        samples.append((time.perf_counter() - began) / len(fresh) * 1e6)
    return statistics.median(samples)


def main() -> int:
    values = [SecretValue(f"xoxb-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}") for _ in range(VALUES)]  # ~45 chars
    needles = needles_of(values)
    batch = records()
    new = RedactingFilter(lambda: needles)
    baseline = per_record(lambda record: bool(record.getMessage()), batch)
    current = per_record(new.filter, batch)
    before = per_record(old_filter(values), batch[: RECORDS // 10])
    leak = logging.LogRecord("bench", logging.INFO, __file__, 1, "token %s", (values[500].reveal(),), None)
    new.filter(leak)
    assert values[500].reveal() not in leak.getMessage(), "the filter missed a value"
    print(f"Redacting log filter, {VALUES} values held, {RECORDS} typical records, median of {REPEATS}")
    print()
    print("| filter | µs per record | vs baseline |")
    print("|---|---|---|")
    print(f"| baseline (getMessage only) | {baseline:.1f} | 1.0x |")
    print(f"| RedactingFilter (indexed, built once per value change) | {current:.1f} | {current / baseline:.1f}x |")
    print(f"| before: a search per value, rebuilt per record | {before:.1f} | {before / baseline:.0f}x |")
    print()
    print(f"Cost of the filter itself: {current - baseline:.1f} µs per record (target: under 50 µs).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
