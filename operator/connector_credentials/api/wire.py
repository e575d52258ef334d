"""The socket's wire format: the bodies the credential server sends (one place, next to the server).

A credential's 200 body is rendered once per fetch (by the engine, through :func:`render_credential`)
and served as bytes afterwards; errors have one shape, ``{"error": {"reason", "message"}}``. A watch
stream's line (:func:`watch_line`) wraps those same bodies with their status.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from connector_credentials.api.values import SecretValue
from connector_credentials.client.protocol import JSON_CONTENT_TYPE, RESPONSE_HEADERS, error_document

#: Every response: never cached by anyone, never sniffed (the socket contract's headers).
HEADERS = RESPONSE_HEADERS
JSON_HEADERS = {"Content-Type": JSON_CONTENT_TYPE, **HEADERS}


class RenderedBody:
    """A rendered 200 body. It holds a value, so it never shows it: not in ``repr``, ``str``, or
    pytest's comparison output (which prints the ``repr`` of what it compares)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"RenderedBody(<{len(self.data)} bytes, masked>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RenderedBody) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __reduce__(self) -> Any:
        raise TypeError("rendered credential bodies are not picklable")


def render_credential(value: SecretValue, version_id: str, arn: str, fetched_at: datetime.datetime) -> RenderedBody:
    """The 200 body for a credential."""
    payload = {
        "value": value.wire_text(),
        "encoding": value.encoding,
        "versionId": version_id,
        "arn": arn,
        "fetchedAt": rfc3339(fetched_at),
    }
    return RenderedBody(json.dumps(payload).encode())


def error_body(reason: str, message: str) -> str:
    return json.dumps(error_document(reason, message))


def closing_error(status: int, phrase: str, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer that ends the connection, for a peer refused before it sent anything."""
    body = error_body(reason, message).encode()
    head = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {JSON_CONTENT_TYPE}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in HEADERS.items()),
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def watch_line(status: int, body: bytes) -> bytes:
    """One line of a watch stream: what a plain GET answered (``status`` and its ``body``), as
    ``{"status": 200, "credential": <the 200 body>}`` or ``{"status": 503, "error": <its error object>}``.

    The 200 body goes in as the bytes it was rendered to (never parsed again: it holds the value);
    an error body is the error shape with the status beside it. ``json.dumps`` escapes every
    newline inside a string, so a line never holds one.
    """
    if status == 200:
        return b'{"status": 200, "credential": ' + body + b"}\n"
    return json.dumps({"status": status, **json.loads(body)}).encode() + b"\n"


def json_body(payload: dict[str, Any]) -> str:
    return json.dumps(payload)


def rfc3339(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
