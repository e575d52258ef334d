"""Noticing that the watch listed the credentials again, so that what vanished meanwhile is forgotten.

A watch that cannot resume (410 Gone: the resourceVersion it watched from is older than the
API server's history, after a long disconnect, a compaction or an API server restart), or whose
listing failed, lists the objects again and watches on from there. The objects listed come as
events without a type, and nothing comes for an object deleted while the watch was down: no
DELETED ever will. So when a re-list is noticed, the command line lists the credentials itself
(that listing's end and resourceVersion are known) and the engine forgets what is not in it
(:func:`unlisted`, applied by :meth:`~connector_credentials.core.engine.Engine.forget_unlisted`).

kopf does not tell its handlers that a listing starts or ends. A re-list shows as an event
without a type for an object the watch has delivered already; the first listing delivers each
object once. An object first seen in a listing after the operator's own first listing, and
not known to the engine, is noticed too (a re-list may hold only objects created meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from connector_credentials.core.entry import Entry, Key

#: A re-list comes as one event per object: its events are waited for until none came for this
#: long, so that one listing of the operator's follows one re-list.
SETTLE = 1.0
#: ...but not for longer than this after the first (a busy watch must not put the listing off).
SETTLE_AT_MOST = 10.0


class Relists:
    """What the watch delivered (keys only), and whether a re-list was noticed since the last listing."""

    def __init__(self) -> None:
        # Every object the watch has delivered and not deleted: about 0.2 KiB per credential.
        self._delivered: set[Key] = set()
        self._noticed = asyncio.Event()

    @property
    def noticed(self) -> bool:
        return self._noticed.is_set()

    def saw(self, kind: str | None, key: Key, *, known: bool, synced: bool) -> None:
        """An event of the watch: ``kind`` is its type (``None``: listed); ``known``: the engine had
        ``key`` before this event; ``synced``: the operator's own first listing has landed."""
        if kind == "DELETED":
            self._delivered.discard(key)
            return
        if kind is None and (key in self._delivered or (synced and not known)):
            self._noticed.set()
        self._delivered.add(key)

    def forgotten(self, keys: Iterable[Key]) -> None:
        """The engine forgot these (gone from a fresh listing): the watch will say nothing more of them."""
        self._delivered.difference_update(keys)

    async def settled(self, *, settle: float = SETTLE, at_most: float = SETTLE_AT_MOST) -> None:
        """Return once a re-list was noticed and its events stopped coming (or ``at_most`` after the first).

        The notice is cleared on return: a re-list noticed while the caller lists is waited for anew.
        """
        await self._noticed.wait()
        loop = asyncio.get_running_loop()
        until = loop.time() + at_most
        while True:
            self._noticed.clear()
            quiet = min(settle, until - loop.time())
            if quiet <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(quiet):
                    await self._noticed.wait()
            if not self._noticed.is_set():
                return


def unlisted(
    entries: Iterable[Entry], listed: set[Key], list_version: str | None, namespaces: list[str] | None
) -> list[Key]:
    """The entries a fresh listing of ``namespaces`` (``None``: all) at ``list_version`` lacks: gone,
    unless last seen at a newer resourceVersion (they came after the listing's snapshot). Versions
    that are not numbers cannot be ordered: such an entry is kept."""
    gone: list[Key] = []
    for entry in entries:
        if entry.key in listed or (namespaces is not None and entry.namespace not in namespaces):
            continue
        try:
            newer = int(entry.api.resource_version or "") > int(list_version or "")
        except ValueError:
            newer = True
        if not newer:
            gone.append(entry.key)
    return gone
