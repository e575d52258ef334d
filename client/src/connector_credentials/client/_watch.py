"""Watching one credential: ``GET /v1/credentials/{namespace}/{name}?watch=true``, kept open.

:class:`CredentialWatch` (threads) and :class:`AsyncCredentialWatch` (asyncio) yield what the
operator answers for the credential, as the clients' ``get`` would return it: a :class:`Credential`,
or a :class:`CredentialError` (yielded, not raised). The current answer comes first, then one item
per change of the value, the versionId, or the status and reason of an error.

Errors about the stream itself rather than the credential (the socket is absent or refuses, no
answer in time, this uid may not read, an answer that is not a watch stream) are yielded too,
once each time the watch loses the operator: the watch then tries again with backoff
(:class:`Backoff`), and after a stream that breaks or ends (the operator restarts) it reconnects.
An item equal to the one before it (:func:`news`) is not yielded again, so a reconnection that
finds nothing changed is silent.

Standard library only, like the rest of the client.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from types import TracebackType
from typing import Final, Protocol, Self

from ._api import Credential, parse_watch_line, raise_for_error
from ._errors import CredentialError, ProtocolError, closed_client, dropped, timed_out, unreachable
from ._http import AsyncConnection, Chunks, Connection, Dropped, Malformed, Response, StreamHead
from .protocol import WATCH_CONTENT_TYPE, WATCH_HEARTBEAT

Item = Credential | CredentialError

#: A stream silent this long (two heartbeats and some) is taken for dead, and the watch reconnects.
SILENCE_LIMIT: Final = 2 * WATCH_HEARTBEAT + 15.0
#: The longest line accepted: a 64 KiB secret, JSON-escaped (up to six bytes a character), and more.
MAX_LINE_BYTES: Final = 1024 * 1024
#: Reconnection delays: the first, the factor, the cap, and the random part (± this fraction).
BACKOFF_FIRST: Final = 0.1
BACKOFF_FACTOR: Final = 2.0
BACKOFF_CAP: Final = 5.0
BACKOFF_JITTER: Final = 0.2


class Backoff:
    """The delays between attempts: :data:`BACKOFF_FIRST`, doubling up to :data:`BACKOFF_CAP`, each
    drawn within ±:data:`BACKOFF_JITTER` so that many watchers do not reconnect in step;
    :meth:`reset` once a stream delivers."""

    def __init__(self, draw: Callable[[float, float], float] = random.uniform) -> None:
        self._draw = draw
        self._step = BACKOFF_FIRST

    def next(self) -> float:
        step = self._step
        self._step = min(step * BACKOFF_FACTOR, BACKOFF_CAP)
        return step * self._draw(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)

    def reset(self) -> None:
        self._step = BACKOFF_FIRST


def news(item: Item) -> tuple[object, ...]:
    """What makes an item news: for a credential its value, encoding and versionId (not when it
    was fetched); for an error its kind, status and reason (not its message)."""
    if isinstance(item, Credential):
        return (Credential, item.value, item.encoding, item.version_id)
    return (type(item), item.status, item.reason)


class _Trouble(Exception):
    """The stream could not start, or went wrong: ``error`` is yielded (once), then a backoff."""

    def __init__(self, error: CredentialError) -> None:
        super().__init__(error.message)
        self.error = error


def _stream_trouble(answer: Response, what: str) -> _Trouble:
    """A watch answered with a whole document instead of a stream: the error it stands for."""
    if answer.status == 200:
        message = f"the operator answered the {what} with one document: it does not stream (an older version?)"
        return _Trouble(ProtocolError(message, status=200))
    try:
        raise_for_error(answer, what)
    except CredentialError as exc:
        error = exc
    else:
        error = ProtocolError(f"unexpected HTTP {answer.status} answer to the {what}", status=answer.status)
    return _Trouble(error)


def _check_stream_head(head: StreamHead, what: str) -> None:
    content_type = head.headers.get("content-type", "").partition(";")[0].strip().lower()
    if head.status != 200 or content_type != WATCH_CONTENT_TYPE:
        shown = repr(content_type[:60])
        raise _Trouble(ProtocolError(f"the {what} was answered HTTP {head.status} {shown}", status=head.status))


def _trouble_of(exc: Malformed | OSError, socket_path: str) -> _Trouble:
    if isinstance(exc, Malformed):
        return _Trouble(ProtocolError(exc.message, status=exc.status))
    return _Trouble(ProtocolError(f"connection error on {socket_path} ({exc.__class__.__name__})"))


class _Watch:
    """What both kinds of watch share: the target, what was yielded last, the backoff."""

    def __init__(self, client: _Client, target: str, namespace: str, name: str) -> None:
        self._client, self._target, self._namespace, self._name = client, target, namespace, name
        self._what = f"watch of credential {namespace}/{name}"
        self._last: tuple[object, ...] | None = None
        self._backoff = Backoff()
        #: True once a stream has delivered its first line: an error yielded before is one that
        #: kept the watch from starting (``connector-credentials get --watch`` exits on it).
        self.started = False

    def _is_news(self, item: Item, *, from_stream: bool) -> bool:
        if from_stream:
            self.started = True
            self._backoff.reset()
        key = news(item)
        if key == self._last:
            return False
        self._last = key
        return True

    def _lines(self, chunks: Chunks, data: bytes) -> list[Item]:
        try:
            lines = chunks.feed(data)
            return [parse_watch_line(line, self._namespace, self._name) for line in lines if line]
        except Malformed as exc:
            raise _Trouble(ProtocolError(exc.message)) from None
        except ProtocolError as exc:
            raise _Trouble(exc) from None


class _Client(Protocol):
    """What a watch reads of its client (either kind)."""

    @property
    def socket_path(self) -> str: ...

    @property
    def timeout(self) -> float | None: ...

    @property
    def closed(self) -> bool: ...


class CredentialWatch(_Watch):
    """An iterator of :class:`Credential` or :class:`CredentialError` items (see the module), from
    :meth:`CredentialClient.watch`. Endless: stop it with :meth:`close` (or ``with``), from the
    thread that iterates it or from another one; closing the client stops it at its next
    reconnection. Iterate it from one thread at a time."""

    def __init__(self, client: _Client, target: str, namespace: str, name: str, backlog_wait: float) -> None:
        super().__init__(client, target, namespace, name)
        self._backlog_wait = backlog_wait
        self._closing = threading.Event()
        self._connection: Connection | None = None
        self._items = self._run()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Item:
        return next(self._items)

    def close(self) -> None:
        """Stop watching: the connection closes, and the iteration ends (in another thread blocked
        on the next item, at once: that ``next`` raises ``StopIteration``)."""
        self._closing.set()
        connection = self._connection
        if connection is not None:
            connection.interrupt()
        with contextlib.suppress(ValueError):  # iterated by another thread right now: it stops by itself
            self._items.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CredentialWatch({self._namespace}/{self._name}, started={self.started})"

    def _run(self) -> Generator[Item]:
        while not self._closing.is_set():
            if self._client.closed:
                raise closed_client()
            try:
                with contextlib.closing(self._stream()) as items:
                    for item in items:
                        if self._is_news(item, from_stream=True) and not self._closing.is_set():
                            yield item
            except _Trouble as trouble:
                if self._is_news(trouble.error, from_stream=False) and not self._closing.is_set():
                    yield trouble.error
            self._closing.wait(self._backoff.next())

    def _stream(self) -> Generator[Item]:
        """One connection: the items its lines carry, until it ends, breaks or falls silent."""
        path = self._client.socket_path
        try:
            conn = Connection.open(path, self._client.timeout, self._backlog_wait)
        except TimeoutError:
            raise _Trouble(timed_out(path, self._client.timeout)) from None
        except OSError as exc:
            raise _Trouble(unreachable(path, exc)) from None
        self._connection = conn
        if self._closing.is_set():  # closed from another thread while this one connected
            conn.interrupt()
        try:
            try:
                opened = conn.open_stream(self._target, WATCH_CONTENT_TYPE, SILENCE_LIMIT)
            except Dropped:
                raise _Trouble(dropped(path)) from None
            except TimeoutError:
                raise _Trouble(timed_out(path, SILENCE_LIMIT)) from None
            except (Malformed, OSError) as exc:
                raise _trouble_of(exc, path) from None
            if isinstance(opened, Response):
                raise _stream_trouble(opened, self._what)
            head, data = opened
            _check_stream_head(head, self._what)
            chunks = Chunks(MAX_LINE_BYTES)
            while True:
                yield from self._lines(chunks, data)
                if chunks.ended:
                    return  # the operator ended the stream (it is shutting down): reconnect
                try:
                    data = conn.receive()
                except OSError:  # silent for SILENCE_LIMIT (TimeoutError), or reset
                    return
                if not data:
                    return  # closed without the last chunk
        finally:
            self._connection = None
            conn.close()


class AsyncCredentialWatch(_Watch):
    """An async iterator of :class:`Credential` or :class:`CredentialError` items (see the module),
    from :meth:`AsyncCredentialClient.watch`. Endless: stop it with :meth:`aclose` (or ``async
    with``), or cancel the task iterating it; closing the client stops it at its next reconnection."""

    def __init__(self, client: _Client, target: str, namespace: str, name: str) -> None:
        super().__init__(client, target, namespace, name)
        self._items = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Item:
        return await anext(self._items)

    async def aclose(self) -> None:
        """Stop watching: the connection closes, and the iteration ends."""
        await self._items.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncCredentialWatch({self._namespace}/{self._name}, started={self.started})"

    async def _run(self) -> AsyncGenerator[Item]:
        import asyncio  # here, not at the top: the synchronous client (and the CLI) never pay for it

        while True:
            if self._client.closed:
                raise closed_client()
            try:
                async with contextlib.aclosing(self._stream()) as items:
                    async for item in items:
                        if self._is_news(item, from_stream=True):
                            yield item
            except _Trouble as trouble:
                if self._is_news(trouble.error, from_stream=False):
                    yield trouble.error
            await asyncio.sleep(self._backoff.next())

    async def _stream(self) -> AsyncGenerator[Item]:
        """One connection: the items its lines carry, until it ends, breaks or falls silent."""
        import asyncio

        path = self._client.socket_path
        conn: AsyncConnection | None = None
        try:
            try:
                async with asyncio.timeout(self._client.timeout):
                    conn = await AsyncConnection.open(path)
                async with asyncio.timeout(SILENCE_LIMIT):
                    opened = await conn.open_stream(self._target, WATCH_CONTENT_TYPE)
            except TimeoutError:
                raise _Trouble(timed_out(path, self._client.timeout if conn is None else SILENCE_LIMIT)) from None
            except Dropped:
                raise _Trouble(dropped(path)) from None
            except OSError as exc:
                if conn is None:
                    raise _Trouble(unreachable(path, exc)) from None
                raise _trouble_of(exc, path) from None
            except Malformed as exc:
                raise _trouble_of(exc, path) from None
            if isinstance(opened, Response):
                raise _stream_trouble(opened, self._what)
            _check_stream_head(opened, self._what)
            chunks = Chunks(MAX_LINE_BYTES)
            while True:
                try:
                    async with asyncio.timeout(SILENCE_LIMIT):
                        data = await conn.receive()
                except OSError:  # silent for SILENCE_LIMIT (TimeoutError), or reset
                    return
                if not data:
                    return  # closed without the last chunk
                for item in self._lines(chunks, data):
                    yield item
                if chunks.ended:
                    return  # the operator ended the stream (it is shutting down): reconnect
        finally:
            if conn is not None:
                conn.abort()
