"""The socket contract, defined once: where the socket is, what may be asked, and the shape of
every answer. The operator's server and this client both import it; ``openapi.json`` (next to
this module) describes the same contract for clients in other languages.

Standard library only, like the rest of the client.
"""

from __future__ import annotations

from typing import Final, Literal
from urllib.parse import quote

__all__ = [
    "CREDENTIALS_PATH",
    "DEFAULT_SOCKET_PATH",
    "ENCODINGS",
    "HEALTHZ_PATH",
    "JSON_CONTENT_TYPE",
    "NAMESPACE_PATTERN",
    "NAME_PATTERN",
    "REFRESH_PARAM",
    "REFRESH_VALUES",
    "RESPONSE_HEADERS",
    "SOCKET_PATH_ENV",
    "WATCH_CONTENT_TYPE",
    "WATCH_HEARTBEAT",
    "WATCH_PARAM",
    "WATCH_VALUES",
    "Encoding",
    "ErrorReason",
    "credential_path",
    "error_document",
]

#: The environment variable that names the socket (the client's and the CLI's default).
SOCKET_PATH_ENV: Final = "CCRED_SOCKET_PATH"
#: Where the operator serves unless told otherwise (``CCRED_SOCKET_PATH`` on both sides).
DEFAULT_SOCKET_PATH: Final = "/var/run/connector-credentials/credentials.sock"

#: ``GET``: every credential's state, never a value; ``GET {CREDENTIALS_PATH}/{namespace}/{name}``: one value.
CREDENTIALS_PATH: Final = "/v1/credentials"
#: ``GET``: ``200 {"status": "ok"}`` once the operator serves, else ``503 NotReady``.
HEALTHZ_PATH: Final = "/healthz"
#: What the server accepts as a namespace (a DNS-1123 label) and as a name; anything else is 400.
#: (The client checks names more strictly before it sends: each dot-separated part of a name too.)
NAMESPACE_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
#: ``?refresh=true``: read from Secrets Manager now rather than answer from the cache.
REFRESH_PARAM: Final = "refresh"
#: What ``refresh`` accepts (case-insensitive), and what each means; empty is ``false``.
REFRESH_VALUES: Final = {"true": True, "1": True, "false": False, "0": False, "": False}
#: ``?watch=true``: a stream (``WATCH_CONTENT_TYPE``, chunked) of what a plain GET answers, one JSON
#: document per line: the current answer first, then one line per change, and an empty line (a
#: heartbeat) after at most ``WATCH_HEARTBEAT`` seconds without one. Same values as ``refresh``.
WATCH_PARAM: Final = "watch"
WATCH_VALUES: Final = REFRESH_VALUES
WATCH_CONTENT_TYPE: Final = "application/x-ndjson"
#: The longest a watch stream stays silent (the operator's ``CCRED_WATCH_HEARTBEAT`` is at most this):
#: a client that hears nothing for much longer may take the stream for dead.
WATCH_HEARTBEAT: Final = 30.0

#: How a 200 body's ``value`` is encoded: the text itself, or base64 of a binary secret.
Encoding = Literal["text", "base64"]
ENCODINGS: Final = ("text", "base64")

#: Every answer carries these: never cached by anyone, never sniffed.
RESPONSE_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"


class ErrorReason:
    """The ``error.reason`` of answers that are not about a credential's check. A 502 or 503 about
    a credential carries its ``Ready`` condition's reason instead (``AccessDenied``, ``Throttled``...)."""

    BAD_REQUEST: Final = "BadRequest"
    PERMISSION_DENIED: Final = "PermissionDenied"
    NOT_FOUND: Final = "NotFound"
    METHOD_NOT_ALLOWED: Final = "MethodNotAllowed"
    INTERNAL_ERROR: Final = "InternalError"
    PENDING: Final = "Pending"
    NOT_READY: Final = "NotReady"
    SHUTTING_DOWN: Final = "ShuttingDown"


def credential_path(namespace: str, name: str) -> str:
    """The request target of one credential (each segment percent-encoded)."""
    return f"{CREDENTIALS_PATH}/{quote(namespace, safe='')}/{quote(name, safe='')}"


def error_document(reason: str, message: str) -> dict[str, dict[str, str]]:
    """Every error answer's body: ``{"error": {"reason": ..., "message": ...}}``."""
    return {"error": {"reason": reason, "message": message}}
