"""The errors the client raises (or a watch yields): one class per kind of failure, and the errors
of a request that got no answer, worded for whoever runs the controller.

Everything public here is re-exported by :mod:`connector_credentials.client`, which is the
module to import. Standard library only, like the client.
"""

from __future__ import annotations

from .protocol import SOCKET_PATH_ENV


class CredentialError(Exception):
    """Base class of every error this client raises (apart from ``ValueError`` for bad names).

    ``reason`` is the server's machine-readable reason (``NotFound``, ``AccessDenied``,
    ``Throttled``, ...) or, for errors found on this side, the class's own reason.
    ``message`` is the server's human-readable message; ``status`` the HTTP status, or
    ``None`` when no response arrived. None of them ever contains a secret value.
    """

    default_reason: str = "Error"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.status = status

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} [{self.reason}, HTTP {self.status}]"


class CredentialNotFound(CredentialError):
    """404: no ConnectorCredential of that namespace and name is declared."""

    default_reason = "NotFound"


class CredentialUnavailable(CredentialError):
    """502 (AWS refused: ``transient`` is False) or 503 (not resolved yet / transient failure).

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    default_reason = "Unavailable"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, status=status)
        self.retry_after = retry_after
        self.transient = status == 503


class PermissionDenied(CredentialError):
    """403: this process's uid may not read credentials from the socket."""

    default_reason = "Forbidden"


class ProtocolError(CredentialError):
    """The server's answer was malformed or not what the socket API promises."""

    default_reason = "ProtocolError"


class ServerUnreachable(CredentialError):
    """The socket is missing, refuses connections, or dropped the connection mid-request."""

    default_reason = "ServerUnreachable"

    def __init__(self, message: str, *, socket_path: str = "", reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.socket_path = socket_path


class CredentialTimeout(CredentialError, TimeoutError):
    """No complete answer arrived within the client's timeout."""

    default_reason = "Timeout"


# The errors of a request that got no answer, worded for the controller's operators.


def unreachable(socket_path: str, exc: BaseException) -> ServerUnreachable:
    if isinstance(exc, PermissionError):
        return ServerUnreachable(
            f"permission denied on the credentials socket {socket_path}: this process's uid/gid may not "
            "open it; run the controller with the group the operator's socket mode allows (e.g. a shared "
            "fsGroup) and a uid in the operator's allowed uids",
            socket_path=socket_path,
        )
    if isinstance(exc, FileNotFoundError):
        problem = "does not exist"
    elif isinstance(exc, ConnectionRefusedError):
        problem = "refuses connections"
    else:
        problem = f"cannot be connected to ({exc.__class__.__name__}: {exc})"
    return ServerUnreachable(
        f"the credentials socket {socket_path} {problem}: the connector-credentials operator sidecar may not "
        "be running (or not ready yet), or the socket volume may not be shared with this container "
        f"(set {SOCKET_PATH_ENV} if the socket lives elsewhere)",
        socket_path=socket_path,
    )


def dropped(socket_path: str) -> ServerUnreachable:
    return ServerUnreachable(
        f"the connector-credentials operator closed the connection on {socket_path} before answering; "
        "the sidecar may be restarting",
        socket_path=socket_path,
    )


def timed_out(socket_path: str, timeout: float | None) -> CredentialTimeout:
    return CredentialTimeout(f"no answer from the connector-credentials operator on {socket_path} within {timeout}s")


def closed_client() -> RuntimeError:
    return RuntimeError("the credential client is closed")
