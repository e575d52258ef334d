"""No background work dies silently.

A task that ends with an exception nobody awaits is reported by asyncio only when it is garbage
collected, if at all, and whatever it did stops for good: a checker that silently stops, a status
that is never written again. Background work runs under :func:`supervise` (restarted after a
capped backoff, and logged) or, for loop callbacks, catches its own bugs and says so with
:func:`log_bug`.

Bugs are logged by type and place only: an exception's message, like its frames' locals, may
quote what was being parsed (a secret value).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from connector_credentials.core.timing import capped_doubling

logger = logging.getLogger(__name__)

#: The first restart of a failed task, doubling up to the cap.
RESTART_BASE = 1.0
RESTART_CAP = 60.0


def describe_bug(exc: BaseException) -> str:
    """An exception for the log without its message: its type and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    return f"{type(exc).__name__} at {where or 'unknown'}"


def log_bug(log: logging.Logger, what: str, exc: BaseException, *, retry_in: float | None = None) -> None:
    """``what`` failed unexpectedly: say so at ERROR, with type and place, never the message."""
    then = f"; retrying in {retry_in:.1f}s" if retry_in is not None else ""
    log.error("%s failed unexpectedly (%s)%s.", what, describe_bug(exc), then)


async def supervise(what: str, run: Callable[[], Awaitable[None]], *, log: logging.Logger = logger) -> None:
    """Run ``run()`` until it returns; when it raises, log it and run it again after a backoff
    (1 s, doubling up to a minute; a run that lasted a minute starts the backoff afresh).
    Cancellation stops it, as it stops any task."""
    attempt = 0
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point: nothing in the background may die silently
            if loop.time() - started >= RESTART_CAP:
                attempt = 0  # a rare bug in a long-lived loop is not a crash loop
            attempt += 1
            delay = capped_doubling(RESTART_BASE, RESTART_CAP, attempt)
            log_bug(log, what, exc, retry_in=delay)
            await asyncio.sleep(delay)
