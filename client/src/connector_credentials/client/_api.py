"""The socket API as the client sees it: values, typed errors, and the parsing that yields them.

Everything public here is re-exported by :mod:`connector_credentials.client`, which is the
module to import. The parsing turns a complete HTTP answer (:class:`_http.Response`) into a
:class:`Credential`, a list of :class:`CredentialInfo` or a :class:`CredentialError` (defined
in ``_errors``), and is shared by the sync and asyncio clients. Standard library only, like the client.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import email.utils
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, NoReturn, Self

from ._errors import (
    CredentialError,
    CredentialNotFound,
    CredentialUnavailable,
    PermissionDenied,
    ProtocolError,
)
from ._http import Response

MASK: Final = "***"

Encoding = Literal["text", "base64"]


# --------------------------------------------------------------------------- values


class Credential:
    """One credential's value and metadata, as ``GET /v1/credentials/{ns}/{name}`` returns it.

    Immutable. ``value`` is the text the server sent: the secret itself for
    ``encoding == "text"``, its base64 form for ``encoding == "base64"`` (binary
    secrets); :attr:`bytes_value` / :meth:`as_bytes` give the raw bytes either way.
    ``repr``/``str``/``format`` show ``value='***'``.
    """

    __slots__ = ("_arn", "_bytes", "_encoding", "_fetched_at", "_name", "_namespace", "_value", "_version_id")

    _namespace: str
    _name: str
    _value: str
    _encoding: Encoding
    _version_id: str
    _arn: str
    _fetched_at: datetime
    _bytes: bytes | None

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        value: str,
        encoding: Encoding = "text",
        version_id: str,
        arn: str,
        fetched_at: datetime,
    ) -> None:
        if encoding == "base64":
            decoded: bytes | None = _b64decode(value)
            if decoded is None:
                # Raised outside the decoder's ``except`` so that no exception context keeps the value.
                raise ValueError("the value is not valid base64")
        elif encoding == "text":
            decoded = None
        else:
            raise ValueError(f"unknown encoding {encoding!r}; expected 'text' or 'base64'")
        for attr, item in (
            ("_namespace", namespace),
            ("_name", name),
            ("_value", value),
            ("_encoding", encoding),
            ("_version_id", version_id),
            ("_arn", arn),
            ("_fetched_at", fetched_at),
            ("_bytes", decoded),
        ):
            object.__setattr__(self, attr, item)

    # Read-only properties (rather than plain attributes) so that type checkers see the immutability.

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> str:
        """The secret as sent: the text itself, or base64 text when :attr:`encoding` is ``"base64"``."""
        return self._value

    @property
    def encoding(self) -> Encoding:
        return self._encoding

    @property
    def version_id(self) -> str:
        return self._version_id

    @property
    def arn(self) -> str:
        return self._arn

    @property
    def fetched_at(self) -> datetime:
        return self._fetched_at

    @property
    def bytes_value(self) -> bytes:
        """The raw secret: base64-decoded for binary secrets, UTF-8 bytes for text ones."""
        return self._bytes if self._bytes is not None else self._value.encode("utf-8")

    def as_bytes(self) -> bytes:
        """Same as :attr:`bytes_value`."""
        return self.bytes_value

    @property
    def is_binary(self) -> bool:
        return self._encoding == "base64"

    def __repr__(self) -> str:
        return (
            f"Credential(namespace={self.namespace!r}, name={self.name!r}, value={MASK!r}, "
            f"encoding={self.encoding!r}, version_id={self.version_id!r}, arn={self.arn!r}, "
            f"fetched_at={self.fetched_at.isoformat()!r})"
        )

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __setattr__(self, attr: str, item: object) -> NoReturn:
        raise AttributeError(f"Credential is immutable; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> NoReturn:
        raise AttributeError(f"Credential is immutable; cannot delete {attr!r}")

    def _identity(self) -> tuple[object, ...]:
        # Everything but the value, which only hmac.compare_digest looks at.
        return (self._namespace, self._name, self._encoding, self._version_id, self._arn, self._fetched_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credential):
            return NotImplemented
        return self._identity() == other._identity() and hmac.compare_digest(
            self._value.encode("utf-8"), other._value.encode("utf-8")
        )

    def __hash__(self) -> int:
        # Deliberately not the value: equal credentials still hash equally.
        return hash(self._identity())

    # Pickling would write the value wherever the pickle goes (caches, task queues, logs).
    def __reduce__(self) -> NoReturn:
        raise TypeError("Credential objects are not picklable (they hold a secret value)")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("Credential objects are not picklable (they hold a secret value)")

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """One entry of ``GET /v1/credentials``: a credential's state, never its value."""

    namespace: str
    name: str
    ready: bool
    arn: str | None = None
    reason: str | None = None
    message: str | None = None
    version_id: str | None = None
    fetched_at: datetime | None = None


# --------------------------------------------------------------------------- answers


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None if absent/unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp into an aware datetime (fractions beyond microseconds dropped).

    ``datetime.fromisoformat`` reads every form the operator writes (``Z``, fractional
    seconds); a time without an offset is refused, since it would be a naive datetime.
    """
    parsed = _aware_or_none(text)
    if parsed is None:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 timestamp")
    return parsed


def _aware_or_none(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


_INVALID: Final = object()


def _loads(body: bytes) -> Any:
    """``json.loads``, or ``_INVALID``; the decoder's exception (which keeps the body) never escapes."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        return _INVALID


def _decode_json(response: Response, what: str) -> Any:
    document = _loads(response.body)
    if document is _INVALID:
        # Raised outside the ``except``: not even ``__context__`` may keep the body (maybe a value).
        raise ProtocolError(
            f"the server's answer to {what} (HTTP {response.status}) is not valid JSON", status=response.status
        )
    return document


def _field(document: Mapping[str, Any], key: str, kind: type, what: str, status: int, *, optional: bool = False) -> Any:
    item = document.get(key)
    if item is None and optional:
        return None
    if not isinstance(item, kind):
        expected = {str: "a string", bool: "a boolean"}.get(kind, kind.__name__)
        state = "missing" if key not in document else f"not {expected}"
        raise ProtocolError(f"the server's answer to {what}: field {key!r} is {state}", status=status)
    return item


def _time_field(
    document: Mapping[str, Any], key: str, what: str, status: int, *, optional: bool = False
) -> datetime | None:
    text = _field(document, key, str, what, status, optional=optional)
    if text is None:
        return None
    parsed = _aware_or_none(text)
    if parsed is None:
        shown = repr(text[:64])
        raise ProtocolError(
            f"the server's answer to {what}: field {key!r} is not an RFC 3339 timestamp ({shown})", status=status
        )
    return parsed


def raise_for_error(response: Response, what: str) -> None:
    """Raise the :class:`CredentialError` a non-2xx response stands for; return on 2xx."""
    status = response.status
    if 200 <= status < 300:
        return
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    raise _error_of(_decode_json(response, what), status, what, retry_after)


def _error_of(document: Any, status: int, what: str, retry_after: float | None) -> CredentialError:
    """The :class:`CredentialError` an error document ``{"error": {"reason", "message"}}`` of ``status`` stands for."""
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        raise ProtocolError(f"the server's HTTP {status} answer to {what} has no 'error' object", status=status)
    reason = _field(error, "reason", str, what, status)
    message = _field(error, "message", str, what, status)
    if status == 404:
        return CredentialNotFound(message, reason=reason, status=status)
    if status == 403:
        return PermissionDenied(message, reason=reason, status=status)
    if status in (502, 503):
        return CredentialUnavailable(message, reason=reason, status=status, retry_after=retry_after)
    return CredentialError(message, reason=reason, status=status)


def _ok_document(response: Response, what: str) -> Any:
    raise_for_error(response, what)
    if response.status != 200:
        raise ProtocolError(f"unexpected HTTP {response.status} answer to {what}", status=response.status)
    return _decode_json(response, what)


def parse_credential(response: Response, namespace: str, name: str) -> Credential:
    """Turn the answer to ``GET /v1/credentials/{namespace}/{name}`` into a :class:`Credential`."""
    what = f"GET credential {namespace}/{name}"
    return _credential_of(_ok_document(response, what), response.status, what, namespace, name)


def parse_watch_line(line: bytes, namespace: str, name: str) -> Credential | CredentialError:
    """One line of a watch stream: what a plain GET answered then (returned, not raised: an error is
    news about the credential, not a failure of the stream). A malformed line raises :class:`ProtocolError`."""
    what = f"watch of credential {namespace}/{name}"
    document = _loads(line)
    status = document.get("status") if isinstance(document, dict) else None
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        # Raised without the line or the decoder's exception: a line may hold a value.
        raise ProtocolError(f"the server sent a line of the {what} without a status")
    assert isinstance(document, dict)
    if status == 200:
        return _credential_of(document.get("credential"), status, what, namespace, name)
    # A stream line carries no Retry-After: its heartbeat-bounded next line says when it changes.
    return _error_of({"error": document.get("error")}, status, what, None)


def _credential_of(document: Any, status: int, what: str, namespace: str, name: str) -> Credential:
    """The :class:`Credential` a 200 body ``{"value", "encoding", "versionId", "arn", "fetchedAt"}`` stands for."""
    if not isinstance(document, dict):
        raise ProtocolError(f"the server's answer to {what} is not a JSON object", status=status)
    raw_encoding = document.get("encoding")
    encoding: Encoding
    if raw_encoding is None or raw_encoding == "text":
        encoding = "text"
    elif raw_encoding == "base64":
        encoding = "base64"
    else:
        shown = repr(raw_encoding)[:40] if isinstance(raw_encoding, str) else type(raw_encoding).__name__
        raise ProtocolError(f"the server's answer to {what} has unknown encoding {shown}", status=status)
    value = _field(document, "value", str, what, status)
    version_id = _field(document, "versionId", str, what, status)
    arn = _field(document, "arn", str, what, status)
    fetched_at = _time_field(document, "fetchedAt", what, status)
    assert fetched_at is not None
    if encoding == "base64" and _b64decode(value) is None:
        raise ProtocolError(f"the server's answer to {what}: the value is not valid base64", status=status)
    return Credential(
        namespace=namespace,
        name=name,
        value=value,
        encoding=encoding,
        version_id=version_id,
        arn=arn,
        fetched_at=fetched_at,
    )


def parse_credential_list(response: Response) -> builtins.list[CredentialInfo]:
    """Turn the answer to ``GET /v1/credentials`` into :class:`CredentialInfo` entries."""
    what = "GET /v1/credentials"
    document = _ok_document(response, what)
    status = response.status
    entries = document.get("credentials") if isinstance(document, dict) else None
    if not isinstance(entries, builtins.list):
        raise ProtocolError(f"the server's answer to {what} has no 'credentials' list", status=status)
    infos: builtins.list[CredentialInfo] = []
    for index, entry in enumerate(entries):
        where = f"{what} (entry {index})"
        if not isinstance(entry, dict):
            raise ProtocolError(f"the server's answer to {where} is not a JSON object", status=status)
        infos.append(
            CredentialInfo(
                namespace=_field(entry, "namespace", str, where, status),
                name=_field(entry, "name", str, where, status),
                ready=_field(entry, "ready", bool, where, status),
                arn=_field(entry, "arn", str, where, status, optional=True),
                reason=_field(entry, "reason", str, where, status, optional=True),
                message=_field(entry, "message", str, where, status, optional=True),
                version_id=_field(entry, "versionId", str, where, status, optional=True),
                fetched_at=_time_field(entry, "fetchedAt", where, status, optional=True),
            )
        )
    return infos


def parse_health(response: Response) -> bool:
    """True only for ``200 {"status": "ok"}``; anything else means not healthy."""
    if response.status != 200:
        return False
    document = _loads(response.body)
    return isinstance(document, dict) and document.get("status") == "ok"
