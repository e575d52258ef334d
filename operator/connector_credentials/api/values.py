"""Secret values: a wrapper that never shows itself, ``jsonKey`` extraction, and the index of
the held values' forms that the redacting log filter masks.

A value leaves this wrapper only through :meth:`SecretValue.reveal`, which the socket
server calls to build a response body. ``repr``/``str``/formatting all mask it.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from time import monotonic
from typing import Any, Final, Literal

Encoding = Literal["text", "base64"]
MASK: Final = "***"
#: Forms shorter than this are not searched for (they would mask unrelated text).
MIN_NEEDLE: Final = 4
#: Changes (needles added or withdrawn) kept apart from the redaction index before it is rebuilt whole...
MERGE_AFTER: Final = 256
#: ...or once the oldest of them is this many seconds old (see NeedleIndex).
MERGE_DELAY: Final = 1.0


class JsonKeyError(Exception):
    """``jsonKey`` is set but the secret is not a JSON object or lacks the key."""


class SecretValue:
    """An in-memory secret value (text, or bytes for binary secrets)."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        self._value = value

    def reveal(self) -> str | bytes:
        return self._value

    @property
    def encoding(self) -> Encoding:
        return "base64" if isinstance(self._value, bytes) else "text"

    def wire_text(self) -> str:
        """The value as the socket sends it: text as is, binary as base64."""
        if isinstance(self._value, bytes):
            return base64.b64encode(self._value).decode("ascii")
        return self._value

    def needles(self) -> tuple[str, ...]:
        """Forms of the value a log line could contain (for the redacting filter)."""
        if isinstance(self._value, bytes):
            forms = [base64.b64encode(self._value).decode("ascii")]
            try:
                forms.append(self._value.decode("utf-8"))
            except UnicodeDecodeError:
                pass
            return tuple(forms)
        return (self._value, json.dumps(self._value)[1:-1])

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"SecretValue({MASK}, {self.encoding}, {len(self._value)} chars)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("secret values are not picklable")


@dataclass(frozen=True, slots=True)
class _Table:
    """Needles, and for each 4-character prefix the distinct lengths of the needles that start
    with it, longest first. Built whole, never changed."""

    needles: frozenset[str]
    lengths: dict[str, tuple[int, ...]]
    #: The length of the shortest needle: a text shorter than that is not searched at all.
    shortest: int = sys.maxsize


def _table(needles: Iterable[str]) -> _Table:
    frozen = frozenset(needles)
    lengths: dict[str, tuple[int, ...]] = {}
    for prefix, size in {(needle[:MIN_NEEDLE], len(needle)) for needle in frozen}:
        known = lengths.get(prefix)
        lengths[prefix] = (size,) if known is None else tuple(sorted((*known, size), reverse=True))
    return _Table(frozen, lengths, min((sizes[-1] for sizes in lengths.values()), default=sys.maxsize))


def _extended(table: _Table, needles: Iterable[str]) -> _Table:
    """``table`` and ``needles``, without rebuilding it: a copy of its two containers (C speed), then
    a key per new needle."""
    added = frozenset(needles)
    lengths = dict(table.lengths)
    for needle in added:
        prefix, size = needle[:MIN_NEEDLE], len(needle)
        known = lengths.get(prefix)
        if known is None:
            lengths[prefix] = (size,)
        elif size not in known:
            lengths[prefix] = tuple(sorted((*known, size), reverse=True))
    return _Table(table.needles | added, lengths, min(table.shortest, *map(len, added)))


_NO_NEEDLES: Final = _table(())


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What :meth:`NeedleIndex.redact` reads: the needles held when it was last built whole
    (``base``), the ones added since (``recent``) and the ones of ``base`` withdrawn since."""

    base: _Table
    recent: _Table
    withdrawn: frozenset[str]
    #: When the oldest change not in ``base`` was made (monotonic), None if there is none.
    pending_since: float | None


class NeedleIndex:
    """The forms of the values held ("needles"), for the redacting log filter: an immutable
    snapshot, replaced whenever a value comes or goes.

    The engine calls :meth:`add` when it starts holding a value and :meth:`discard` when it stops;
    the filter calls :meth:`redact` on every record, in whatever thread logs it (botocore logs from
    the AWS worker threads). Updates hold ``_lock``; a record takes no lock: it reads
    ``_snapshot`` once (one reference, swapped by one store) and sees nothing but that snapshot,
    which nobody changes. Once :meth:`add` has returned, every record redacted after it, in any
    thread, finds the value's needles.

    Counts: several credentials can hold the same value (``_holders``), and two values can share
    a form, e.g. a text value and the same text as UTF-8 bytes (``_sources``: values per needle).
    A needle leaves when its last source does. Each value's forms are computed when it is added
    and when it is dropped, never for the others.

    Building the whole snapshot costs O(all needles) (a few ms at 10,000). A first pass adds
    thousands of values one at a time, each followed by a log line, so rebuilding it whole on
    every change (or lazily, at the next record) would cost O(N²): a change extends the table of
    the needles added since the last whole rebuild (a copy of it, made at C speed; a needle
    leaving it rebuilds it) or the set of those withdrawn since, and the whole snapshot is rebuilt
    once :data:`MERGE_AFTER` changes are pending, or by the first update or record (in whatever
    thread) once the oldest of them is :data:`MERGE_DELAY` seconds old. While changes are pending
    a record looks each position up in both tables. It skips the positions where no needle would
    fit: a line shorter than every value held is not searched at all.
    """

    __slots__ = ("_holders", "_lock", "_recent", "_since", "_snapshot", "_sources", "_withdrawn")

    def __init__(self, values: Iterable[SecretValue] = ()) -> None:
        self._lock = threading.Lock()
        self._holders: dict[SecretValue, int] = {}  # holders of each value
        self._sources: dict[str, int] = {}  # values each needle comes from: every needle held
        self._recent: set[str] = set()  # needles held that the base of the snapshot lacks
        self._withdrawn: set[str] = set()  # needles of the base of the snapshot no longer held
        self._since: float | None = None
        self._snapshot = _Snapshot(_NO_NEEDLES, _NO_NEEDLES, frozenset(), None)
        for value in values:
            self.add(value)
        self._settled()  # the values given: one index, built whole

    def add(self, value: SecretValue) -> None:
        """One more holder of ``value``: its needles are masked from now on if it was not held yet."""
        with self._lock:
            holders = self._holders.get(value, 0)
            self._holders[value] = holders + 1
            if holders:
                return
            added = []
            for needle in _forms(value):
                sources = self._sources.get(needle, 0)
                self._sources[needle] = sources + 1
                if sources:
                    continue
                if needle in self._withdrawn:
                    self._withdrawn.discard(needle)  # the base still has it
                else:
                    self._recent.add(needle)
                    added.append(needle)
            self._publish(added)

    def discard(self, value: SecretValue) -> None:
        """One holder less: the value's needles leave when its last holder does (no-op if not held)."""
        with self._lock:
            holders = self._holders.get(value, 0)
            if holders > 1:
                self._holders[value] = holders - 1
                return
            if not holders:
                return
            del self._holders[value]
            recent_left = False
            for needle in _forms(value):
                sources = self._sources[needle] - 1
                if sources:
                    self._sources[needle] = sources
                    continue
                del self._sources[needle]
                if needle in self._recent:
                    self._recent.discard(needle)
                    recent_left = True
                else:
                    self._withdrawn.add(needle)
            self._publish(None if recent_left else [])

    def _publish(self, added: list[str] | None) -> None:
        """A new snapshot (under the lock), rebuilt whole when enough changes are pending, or old
        enough. ``added``: the needles the table of recent ones gains (None: it lost one, rebuild it)."""
        pending = len(self._recent) + len(self._withdrawn)
        if not pending:  # e.g. a needle withdrawn and added again: the base says it all
            self._since = None
            self._snapshot = _Snapshot(self._snapshot.base, _NO_NEEDLES, frozenset(), None)
            return
        now = monotonic()
        if self._since is None:
            self._since = now
        if pending >= MERGE_AFTER or now - self._since >= MERGE_DELAY:
            self._rebuild()
            return
        recent = self._snapshot.recent
        if added is None:
            recent = _table(self._recent)
        elif added:
            recent = _extended(recent, added)
        self._snapshot = _Snapshot(self._snapshot.base, recent, frozenset(self._withdrawn), self._since)

    def _rebuild(self) -> None:
        self._recent.clear()
        self._withdrawn.clear()
        self._since = None
        self._snapshot = _Snapshot(_table(self._sources), _NO_NEEDLES, frozenset(), None)

    def _settled(self) -> _Snapshot:
        """The snapshot with the pending changes built in (a record after a burst of changes)."""
        with self._lock:
            if self._since is not None:
                self._rebuild()
            return self._snapshot

    def needles(self) -> frozenset[str]:
        """The needles searched for now (a copy)."""
        with self._lock:
            return frozenset(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        return f"NeedleIndex({len(self._holders)} values, {len(self._sources)} needles)"

    def redact(self, text: str) -> str:
        """``text`` with every needle in it replaced by the mask, longest match first, left to right."""
        snapshot = self._snapshot
        if snapshot.pending_since is not None and monotonic() - snapshot.pending_since >= MERGE_DELAY:
            snapshot = self._settled()
        base, recent, withdrawn = snapshot.base, snapshot.recent, snapshot.withdrawn
        # No needle starts after this position (none would fit): a line shorter than every value is not searched.
        last = len(text) - min(base.shortest, recent.shortest)
        if last < 0:
            return text
        lengths_of, needles, fresh = base.lengths.get, base.needles, recent.needles
        recent_lengths = recent.lengths.get if recent.lengths else None
        parts: list[str] = []
        start = 0  # where the text not masked yet begins
        for i in range(last + 1):
            if i < start:  # inside the needle just masked
                continue
            prefix = text[i : i + MIN_NEEDLE]
            lengths = lengths_of(prefix)
            if recent_lengths is not None and (more := recent_lengths(prefix)) is not None:
                lengths = more if lengths is None else tuple(sorted({*lengths, *more}, reverse=True))
            if lengths is None:
                continue
            for size in lengths:
                # Near the end the slice is shorter than ``size``: if it is a needle, it is the
                # longest one that fits here, so it is the right match all the same.
                piece = text[i : i + size]
                if piece in fresh or (piece in needles and piece not in withdrawn):
                    parts += (text[start:i], MASK)
                    start = i + len(piece)
                    break
        if not parts:
            return text
        parts.append(text[start:])
        return "".join(parts)


def _forms(value: SecretValue) -> set[str]:
    # A set: a text value's JSON-escaped form is often the value itself.
    return {needle for needle in value.needles() if len(needle) >= MIN_NEEDLE}


def extract(raw: str | bytes, json_key: str | None) -> SecretValue:
    """The value to serve: the whole secret, or one top-level key of a JSON object.

    A key whose value is a string is served as that string; any other JSON value
    (number, boolean, null, object, array) is served as its compact JSON text.
    """
    if json_key is None:
        return SecretValue(raw)
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonKeyError("the secret is binary and not UTF-8 JSON, so jsonKey cannot apply") from None
    else:
        text = raw
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        # RecursionError: nested deeper than the decoder goes ("[" * 5000) is not usable JSON either.
        # Never chain: the decoder's exception keeps the document (the secret) around.
        raise JsonKeyError(
            "the secret is not JSON, so jsonKey cannot apply; remove jsonKey or store a JSON object"
        ) from None
    if not isinstance(document, dict):
        raise JsonKeyError(f"the secret is JSON but not an object (it is a {_json_type(document)})")
    if json_key not in document:
        # The object's other key names are not listed: the status holds nothing derived from the value.
        raise JsonKeyError(
            f"the secret's JSON object has no top-level key {json_key!r} (keys are case-sensitive; "
            "check them with `aws secretsmanager get-secret-value`)"
        )
    selected = document[json_key]
    if isinstance(selected, str):
        return SecretValue(selected)
    return SecretValue(json.dumps(selected, separators=(",", ":"), ensure_ascii=False))


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "string"
