"""Secret values: a wrapper that never shows itself, ``jsonKey`` extraction, and the index of
the held values' forms that the redacting log filter masks.

A value leaves this wrapper only through :meth:`SecretValue.reveal`, which the socket
server calls to build a response body. ``repr``/``str``/formatting all mask it.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable
from typing import Any, Final, Literal

Encoding = Literal["text", "base64"]
MASK: Final = "***"
#: Forms shorter than this are not searched for (they would mask unrelated text).
MIN_NEEDLE: Final = 4


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


class NeedleIndex:
    """The forms of the values held ("needles"), kept up to date one value at a time.

    The engine calls :meth:`add` when it starts holding a value and :meth:`discard` when it
    stops: each costs O(that value's needles), whatever else is held. The redacting log filter
    calls :meth:`redact` on every record: one pass over the text, a dict lookup per position.
    Counts are kept at two levels: several credentials can hold the same value (``_values``:
    holders per value), and two values can share a form, e.g. a text value and the same text as
    UTF-8 bytes (``_needles``: values per needle). A needle leaves when its last source does.

    The index: ``_needles`` (every needle), and ``_lengths``, for each 4-character prefix of a
    needle, the distinct lengths of the needles that start with it, longest first. At a position
    whose next 4 characters are a known prefix, the longest needle there is the first of those
    lengths whose slice is in ``_needles``: the same match as a search over the needles longest
    first, and one lookup per distinct length instead of one comparison per needle (values that
    share a prefix, such as ``xoxb-`` tokens, usually share a length too).

    Threads: records are redacted in whatever thread logs them (botocore logs from the AWS worker
    threads) while the event loop updates the index. Updates are serialised by ``_lock``;
    :meth:`redact` takes no lock (a reader holding it would make the event loop wait on another
    thread's traceback) and sees no copy of the whole index (copying it is the O(all values) per
    change this class removes). Instead it never iterates a shared container: it only looks keys
    up in ``_needles`` and ``_lengths``, which updates change one key at a time (a single dict
    operation is atomic, under the GIL and in free-threaded builds alike), and the values of
    ``_lengths`` are small tuples, built aside and swapped in by one store, never changed in
    place. An update publishes a needle in ``_needles`` before its length in ``_lengths``, and
    withdraws it from ``_needles`` before its length, so a reader that finds a length with no
    needle behind it just misses (no error), and an update in flight can only make a concurrent
    record miss the needle being updated, never another one. Once :meth:`add` has returned,
    every record redacted after that, in any thread, finds the value's needles.
    """

    __slots__ = ("_lengths", "_lock", "_needles", "_per_length", "_values")

    def __init__(self, values: Iterable[SecretValue] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[SecretValue, int] = {}  # holders of each value
        self._needles: dict[str, int] = {}  # values each needle comes from; read by redact()
        self._lengths: dict[str, tuple[int, ...]] = {}  # prefix -> distinct lengths; read by redact()
        self._per_length: dict[tuple[str, int], int] = {}  # (prefix, length) -> needles; updates only
        for value in values:
            self.add(value)

    def add(self, value: SecretValue) -> None:
        """One more holder of ``value``: its needles are indexed if it was not held yet."""
        with self._lock:
            holders = self._values.get(value, 0)
            self._values[value] = holders + 1
            if holders:
                return
            for needle in _forms(value):
                sources = self._needles.get(needle, 0)
                self._needles[needle] = sources + 1  # published before its length (see the class)
                if not sources:
                    self._link(needle)

    def discard(self, value: SecretValue) -> None:
        """One holder less: the value's needles leave when its last holder does (no-op if not held)."""
        with self._lock:
            holders = self._values.get(value, 0)
            if holders > 1:
                self._values[value] = holders - 1
                return
            if not holders:
                return
            del self._values[value]
            for needle in _forms(value):
                sources = self._needles[needle] - 1
                if sources:
                    self._needles[needle] = sources
                else:
                    del self._needles[needle]  # withdrawn before its length (see the class)
                    self._unlink(needle)

    def _link(self, needle: str) -> None:
        prefix, size = needle[:MIN_NEEDLE], len(needle)
        count = self._per_length.get((prefix, size), 0)
        self._per_length[prefix, size] = count + 1
        if not count:  # a new length for this prefix: a new tuple, published in one store
            self._lengths[prefix] = tuple(sorted((*self._lengths.get(prefix, ()), size), reverse=True))

    def _unlink(self, needle: str) -> None:
        prefix, size = needle[:MIN_NEEDLE], len(needle)
        count = self._per_length.pop((prefix, size)) - 1
        if count:
            self._per_length[prefix, size] = count
            return
        lengths = tuple(n for n in self._lengths[prefix] if n != size)
        if lengths:
            self._lengths[prefix] = lengths
        else:
            del self._lengths[prefix]

    def needles(self) -> frozenset[str]:
        """The needles searched for now (a copy)."""
        with self._lock:
            return frozenset(self._needles)

    def __len__(self) -> int:
        return len(self._needles)

    def __repr__(self) -> str:
        return f"NeedleIndex({len(self._values)} values, {len(self._needles)} needles)"

    def redact(self, text: str) -> str:
        """``text`` with every needle in it replaced by the mask, longest match first, left to right."""
        lengths_of, needles = self._lengths, self._needles
        if not lengths_of or len(text) < MIN_NEEDLE:
            return text
        get = lengths_of.get
        parts: list[str] = []
        start = 0  # where the text not masked yet begins
        for i in range(len(text) - MIN_NEEDLE + 1):
            if i < start:  # inside the needle just masked
                continue
            lengths = get(text[i : i + MIN_NEEDLE])
            if lengths is None:
                continue
            for size in lengths:
                # Near the end the slice is shorter than ``size``: if it is a needle, it is the
                # longest one that fits here, so it is the right match all the same.
                piece = text[i : i + size]
                if piece in needles:
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
