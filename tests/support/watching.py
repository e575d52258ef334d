"""A client's ``watch`` iterated in the background, for tests that follow what it yields with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Any

from connector_credentials.client import AsyncCredentialClient, Credential, CredentialClient, CredentialError

Item = Credential | CredentialError


class Watcher:
    """A client's watch, iterated in the background (a thread, or a task on a loop in a thread), its
    items queued for the test to take with a deadline."""

    def __init__(self, kind: str, path: str, namespace: str, name: str) -> None:
        self.kind, self.path, self.namespace, self.name = kind, path, namespace, name
        self.items: queue.Queue[Item] = queue.Queue()
        self.watch: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._sync if kind == "sync" else self._async, daemon=True)
        self._thread.start()
        for _ in range(500):  # until the watch exists (its thread made the client)
            if self.watch is not None:
                break
            threading.Event().wait(0.01)

    def _sync(self) -> None:
        with CredentialClient(self.path, timeout=2) as client, client.watch(self.namespace, self.name) as watch:
            self.watch = watch
            for item in watch:
                self.items.put(item)

    def _async(self) -> None:
        async def follow() -> None:
            async with AsyncCredentialClient(self.path, timeout=2) as client:
                watch = self.watch = client.watch(self.namespace, self.name)
                async with watch:
                    async for item in watch:
                        self.items.put(item)

        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(follow())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    def next(self, timeout: float = 10.0) -> Item:
        return self.items.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            self.items.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        """Stop the watch from this thread: ``close`` for the sync one, cancelling for the async one."""
        if self.kind == "sync":
            self.watch.close()
        else:
            assert self._loop is not None and self._task is not None
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the watch did not stop"
