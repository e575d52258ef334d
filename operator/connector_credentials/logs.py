"""Logging that cannot leak: library loggers pinned, and a redacting filter behind them."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Sequence

import kopf

from connector_credentials.values import MASK

#: Loggers that print request/response bodies at DEBUG. They stay at WARNING even with --verbose.
PINNED_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "kubernetes",
    "kubernetes.client.rest",
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.server",
    "aiohttp.web",
)
#: Values shorter than this are not searched for (they would mask unrelated text).
MIN_NEEDLE = 4


class Redactor:
    """Finds every needle in a text in one pass: needles indexed by their first characters.

    Built once per set of values (not per record): with 1,000 values a record costs a few
    microseconds per hundred characters instead of a search per value.
    """

    def __init__(self, needles: Iterable[str]) -> None:
        by_prefix: dict[str, list[str]] = {}
        for needle in sorted({n for n in needles if len(n) >= MIN_NEEDLE}, key=len, reverse=True):
            by_prefix.setdefault(needle[:MIN_NEEDLE], []).append(needle)  # longest first
        self._by_prefix = by_prefix

    def __bool__(self) -> bool:
        return bool(self._by_prefix)

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


class RedactingFilter(logging.Filter):
    """Replaces any known secret value in a record (message, args, traceback) with a mask.

    A second line of defence: nothing should log a value in the first place. ``needles`` returns
    the same tuple until the values change (the engine caches it), so the index is rebuilt only then.
    """

    def __init__(self, needles: Callable[[], Sequence[str]]) -> None:
        super().__init__("redact")
        self._needles = needles
        self._source: Sequence[str] | None = None
        self._redactor = Redactor(())

    def redactor(self) -> Redactor:
        needles = self._needles()
        if needles is not self._source:
            self._source, self._redactor = needles, Redactor(needles)
        return self._redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor()
        if not redactor:
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


class QuietWatchFilter(logging.Filter):
    """Drops kopf's per-event "Handler 'watch' succeeded" line: it says nothing at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "kopf.objects" and record.msg == "Handler 'watch' succeeded.")


def configure(*, verbose: bool, debug: bool, needles: Callable[[], Sequence[str]]) -> None:
    kopf.configure(verbose=verbose, debug=debug)
    if not (verbose or debug):
        logging.getLogger("kopf.objects").addFilter(QuietWatchFilter())
    for name in PINNED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not debug:
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    # Malformed requests on the socket are the client's problem, not an operator error worth a traceback
    # each (a hostile client could flood the log); the server logs its own failures itself.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    redactor = RedactingFilter(needles)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
