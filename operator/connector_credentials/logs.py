"""Logging that cannot leak: library loggers pinned, and a redacting filter behind them."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable

import kopf

from connector_credentials.values import MASK, SecretValue

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


class RedactingFilter(logging.Filter):
    """Replaces any known secret value in a record (message, args, traceback) with a mask.

    A second line of defence: nothing should log a value in the first place.
    """

    def __init__(self, values: Callable[[], Iterable[SecretValue]]) -> None:
        super().__init__("redact")
        self._values = values

    def filter(self, record: logging.LogRecord) -> bool:
        needles = [n for value in self._values() for n in value.needles() if len(n) >= MIN_NEEDLE]
        if not needles:
            return True
        message = record.getMessage()
        redacted = _redact(message, needles)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = _redact(text, needles)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = _redact(record.stack_info, needles)
        return True


def _redact(text: str, needles: list[str]) -> str:
    for needle in needles:
        if needle in text:
            text = text.replace(needle, MASK)
    return text


class QuietWatchFilter(logging.Filter):
    """Drops kopf's per-event "Handler 'watch' succeeded" line: it says nothing at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "kopf.objects" and record.msg == "Handler 'watch' succeeded.")


def configure(*, verbose: bool, debug: bool, values: Callable[[], Iterable[SecretValue]]) -> None:
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
    redactor = RedactingFilter(values)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
