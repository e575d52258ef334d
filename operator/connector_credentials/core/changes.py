"""Who is told when what a credential answers may have changed: the socket's watch streams.

A watcher takes a :meth:`Changes.ticket` *before* it renders what it answers now, then awaits the
ticket: a change made while it was writing that answer still wakes it, because the ticket was taken
first. Tickets are shared by everyone watching the same credential and cost nothing when nobody
watches (the engine's notice is one dict lookup). A wake-up says "look again", not what changed:
the watcher compares what it would answer with what it sent last, so a check that changed nothing
sends nothing.
"""

from __future__ import annotations

import asyncio

Key = tuple[str, str]


class Changes:
    """One future per watched credential, resolved (and replaced) at its next change."""

    def __init__(self) -> None:
        self._tickets: dict[Key, asyncio.Future[None]] = {}

    def ticket(self, key: Key) -> asyncio.Future[None]:
        """Resolved at the next change of ``key``. Shared: await it through :func:`asyncio.shield`
        so that one watcher giving up does not cancel it for the others."""
        ticket = self._tickets.get(key)
        if ticket is None or ticket.done():
            ticket = self._tickets[key] = asyncio.get_running_loop().create_future()
        return ticket

    def notify(self, key: Key) -> None:
        ticket = self._tickets.pop(key, None)
        if ticket is not None and not ticket.done():
            ticket.set_result(None)

    def notify_all(self) -> None:
        for key in list(self._tickets):
            self.notify(key)

    def __len__(self) -> int:
        return len(self._tickets)
