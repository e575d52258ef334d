"""Logging that cannot leak: library loggers pinned, and a redacting filter behind them."""

from __future__ import annotations

import logging
import traceback

import kopf

from connector_credentials.api.values import NeedleIndex

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


class RedactingFilter(logging.Filter):
    """Replaces any known secret value in a record (message, args, traceback) with a mask.

    A second line of defence: nothing should log a value in the first place. ``index`` is the
    engine's live :class:`~connector_credentials.api.values.NeedleIndex`, replaced as values come and
    go: a record reads its current snapshot, from any thread, without a lock (and, once a change is a
    second old and not built in yet, builds it in).
    """

    def __init__(self, index: NeedleIndex | None = None) -> None:
        super().__init__("redact")
        #: Read on every record; ``cli`` points it at the engine's index once the engine exists.
        self.index = index if index is not None else NeedleIndex()

    def filter(self, record: logging.LogRecord) -> bool:
        index = self.index
        if not index:
            return True
        message = record.getMessage()
        redacted = index.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = index.redact(text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = index.redact(record.stack_info)
        return True


class QuietWatchFilter(logging.Filter):
    """Drops kopf's per-event "Handler 'watch' succeeded" line: it says nothing at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "kopf.objects" and record.msg == "Handler 'watch' succeeded.")


def configure(*, verbose: bool, debug: bool) -> RedactingFilter:
    """Sets up logging; returns the redacting filter installed on every handler (its index is empty)."""
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
    redacting = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    return redacting


def configure_for_command() -> RedactingFilter:
    """Logging for a one-shot command (``doctor``): warnings and errors only, on stderr, through the
    redacting filter (its index empty until the command adds what it reads); libraries stay quiet."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    redacting = RedactingFilter()
    handler.addFilter(redacting)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in (*PINNED_LOGGERS, "kopf", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return redacting
