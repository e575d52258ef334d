"""The credential socket's accept-time policy: who may hold a connection, how many may, and for how long.

Nothing here reads a request. The peer's uid (``SO_PEERCRED``) is checked once, when a connection
is accepted; a connection that is not allowed is answered 403 there and then. At most
``CCRED_MAX_CONNECTIONS`` connections are held: at the limit a new one takes the place of the one
idle longest (no request in flight), and only when every connection is busy is the new one
closed at once. A connection must send a complete request head within ``CCRED_HEADER_TIMEOUT``.
A watch stream is a request in flight for as long as it streams: its connection is busy, counted
against the limit and never closed to make room.
What the policy closes is counted and logged at most once per :data:`REPORT_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import socket
import struct
import time
from collections.abc import Iterable
from typing import NamedTuple, Protocol

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
#: Seconds between two log lines about closed connections (and about refusals of one uid).
REPORT_INTERVAL = 10.0
#: File descriptors kept for everything but socket clients: Kubernetes, AWS, logs, the listener.
FD_RESERVE = 128


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_of(transport: asyncio.BaseTransport) -> Peer | None:
    """The credentials the kernel recorded when the peer called ``connect()``; None if unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)))
    except OSError:
        return None


class Connection(Protocol):
    def evict(self) -> None:
        """Close at once (buffered output dropped); ``discard`` follows when the transport is gone."""


class Report:
    """Counts of connections the policy closed; the first event of a quiet period is logged at once,
    the ones after it are summed and logged when :data:`REPORT_INTERVAL` has passed."""

    def __init__(self, max_connections: int, header_timeout: float, interval: float = REPORT_INTERVAL) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.interval = interval
        self.totals: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()
        self._window: asyncio.TimerHandle | None = None

    def add(self, event: str) -> None:
        self.totals[event] += 1
        self._pending[event] += 1
        if self._window is None:
            self._flush()

    def _flush(self, *, again: bool = True) -> None:
        self._window = None
        if not self._pending:
            return
        counts, self._pending = self._pending, collections.Counter()
        level = logging.INFO if set(counts) == {"header_timeout"} else logging.WARNING
        logger.log(level, "Closed socket connections: %s.", self.describe(counts))
        if again:
            self._window = asyncio.get_running_loop().call_later(self.interval, self._flush)

    def describe(self, counts: collections.Counter[str]) -> str:
        parts = []
        if counts["evicted"]:
            parts.append(
                f"{counts['evicted']} idle to make room for new ones (CCRED_MAX_CONNECTIONS={self.max_connections})"
            )
        if counts["turned_away"]:
            parts.append(
                f"{counts['turned_away']} new at once, every one of the {self.max_connections} being busy "
                "(CCRED_MAX_CONNECTIONS)"
            )
        if counts["refused_at_limit"]:
            parts.append(
                f"{counts['refused_at_limit']} of a uid not in CCRED_ALLOWED_UIDS at once, without their 403 "
                f"(CCRED_MAX_CONNECTIONS={self.max_connections})"
            )
        if counts["header_timeout"]:
            parts.append(
                f"{counts['header_timeout']} without a complete request head within {self.header_timeout:g}s "
                "(CCRED_HEADER_TIMEOUT)"
            )
        if counts["stalled_watch"]:
            parts.append(
                f"{counts['stalled_watch']} watch streams whose client took no line for a heartbeat interval "
                "(CCRED_WATCH_HEARTBEAT)"
            )
        return "; ".join(parts) + f" (reported every {self.interval:g}s at most)"

    def close(self) -> None:
        """Log what is still unreported, and stop the timer."""
        if self._window is not None:
            self._window.cancel()
        self._flush(again=False)


class ConnectionTable:
    """The live connections, at most ``limit``: refused ones (lingering after their 403) first in
    line to be closed, then idle ones in the order they became idle, then busy ones (never closed
    to make room)."""

    def __init__(self, limit: int, report: Report) -> None:
        self.limit = limit
        self.report = report
        self._refused: collections.OrderedDict[Connection, None] = collections.OrderedDict()
        self._idle: collections.OrderedDict[Connection, None] = collections.OrderedDict()
        self._busy: set[Connection] = set()

    def __len__(self) -> int:
        return len(self._refused) + len(self._idle) + len(self._busy)

    def admit(self, connection: Connection, *, refused: bool = False) -> bool:
        """Take in a new connection, closing an older one at the limit; False: close the new one.

        A refused peer's connection may only take the place of another refused one: a uid that may
        not read cannot push out the connections of one that may.
        """
        if len(self) >= self.limit:
            victim = next(iter(self._refused), None)
            if victim is None and not refused:
                victim = next(iter(self._idle), None)
            if victim is None:
                self.report.add("refused_at_limit" if refused else "turned_away")
                return False
            self.discard(victim)
            self.report.add("evicted")
            victim.evict()
        (self._refused if refused else self._idle)[connection] = None
        return True

    def busy(self, connection: Connection) -> None:
        """A request head arrived: not to be closed to make room until it is answered."""
        if connection in self._idle:
            del self._idle[connection]
            self._busy.add(connection)

    def idle(self, connection: Connection) -> None:
        """Answered: idle from now on, last in line to be closed to make room."""
        if connection in self._busy:
            self._busy.discard(connection)
            self._idle[connection] = None

    def is_busy(self, connection: Connection) -> bool:
        return connection in self._busy

    def discard(self, connection: Connection) -> None:
        self._refused.pop(connection, None)
        self._idle.pop(connection, None)
        self._busy.discard(connection)

    def refused(self) -> list[Connection]:
        return list(self._refused)


class ConnectionPolicy:
    """What :class:`connector_credentials.adapters.socket.server.CredentialServer`'s connections consult."""

    def __init__(self, allowed_uids: Iterable[int], max_connections: int, header_timeout: float) -> None:
        self.allowed = frozenset(allowed_uids)
        self.header_timeout = header_timeout
        self.report = Report(max_connections, header_timeout)
        self.table = ConnectionTable(max_connections, self.report)
        self._refusal_logged: dict[int, float] = {}
        self._refusals_unlogged = 0

    def allows(self, peer: Peer | None) -> bool:
        return peer is not None and peer.uid in self.allowed

    def log_refusal(self, peer: Peer | None) -> None:
        """One line per uid every :data:`REPORT_INTERVAL` at most; the pid and uid come from the kernel."""
        pid, uid = (peer.pid, peer.uid) if peer else (-1, -1)
        now = time.monotonic()
        if now - self._refusal_logged.get(uid, -REPORT_INTERVAL) < REPORT_INTERVAL:
            self._refusals_unlogged += 1
            return
        if len(self._refusal_logged) > 1024:
            self._refusal_logged.clear()  # bounded: a flood of distinct uids cannot grow it
        unlogged = self._refusals_unlogged
        suppressed = f" ({unlogged} more refused since the last report)" if unlogged else ""
        logger.warning(
            "Refused a connection from pid %d uid %d: uid not in CCRED_ALLOWED_UIDS%s.", pid, uid, suppressed
        )
        self._refusal_logged[uid], self._refusals_unlogged = now, 0

    def close(self) -> None:
        for connection in self.table.refused():
            connection.evict()
        self.report.close()


def raise_fd_limit(needed: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``needed`` (never above the hard limit); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return needed if soft == resource.RLIM_INFINITY else soft
