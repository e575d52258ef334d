"""Secret values: a wrapper that never shows itself, and ``jsonKey`` extraction.

A value leaves this wrapper only through :meth:`SecretValue.reveal`, which the socket
server calls to build a response body. ``repr``/``str``/formatting all mask it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any, Final, Literal

Encoding = Literal["text", "base64"]
MASK: Final = "***"


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


def needles_of(values: Iterable[SecretValue]) -> tuple[str, ...]:
    """Every form of ``values`` a log line could contain (for the redacting filter)."""
    return tuple({needle for value in values for needle in value.needles()})


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
