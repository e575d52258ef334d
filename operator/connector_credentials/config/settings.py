"""Operator settings: ``CCRED_*`` environment variables, overridden by command-line flags."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from connector_credentials.api.models import MIN_REFRESH_SECONDS, parse_duration
from connector_credentials.client.protocol import DEFAULT_SOCKET_PATH, WATCH_HEARTBEAT


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class OperatorSettings(BaseSettings):
    """Everything the operator can be told, apart from AWS (standard AWS_* variables)."""

    # allow_inf_nan: "nan", "inf" and "1e400" (inf) are floats to Python, and durations to nothing.
    model_config = SettingsConfigDict(env_prefix="CCRED_", extra="ignore", frozen=True, allow_inf_nan=False)

    namespace: Annotated[list[str], NoDecode] = Field(default_factory=list)
    all_namespaces: bool = False
    standalone: bool = True
    verbose: bool = False
    debug: bool = False

    socket_path: str = DEFAULT_SOCKET_PATH
    socket_mode: Annotated[int, NoDecode] = 0o660
    allowed_uids: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [os.getuid()])
    #: Connections held on the socket at once; at the limit a new one replaces the one idle longest.
    max_connections: int = Field(default=256, ge=1, le=65536)
    #: Seconds a connection has to send a complete request head (after accept, or after its next request's first byte).
    header_timeout: float = Field(default=5.0, gt=0, le=3600)

    #: A watch stream that has sent nothing this long sends an empty line (and re-checks its answer);
    #: a client that has not taken a line within it is given up. At most the protocol's 30 s, which
    #: clients count on to tell a quiet stream from a dead one.
    watch_heartbeat: float = Field(default=WATCH_HEARTBEAT, gt=0, le=WATCH_HEARTBEAT)

    @field_validator("header_timeout", "watch_heartbeat", mode="before")
    @classmethod
    def _header_timeout(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) and not _is_number(value) else value

    default_refresh_interval: float = 300.0
    max_staleness: float = 900.0
    #: Accept credentials that are not IRSA web-identity ones (node role, static keys).
    allow_non_irsa_credentials: bool = False
    #: Roles a credential may name in spec.roleArn: ARN patterns, ``*`` for any characters. Empty: none.
    assumable_roles: Annotated[list[str], NoDecode] = Field(default_factory=list)

    aws_max_workers: int = Field(default=8, ge=1, le=128)
    aws_connect_timeout: float = Field(default=3.0, gt=0)
    aws_read_timeout: float = Field(default=5.0, gt=0)
    aws_max_attempts: int = Field(default=2, ge=1, le=10)
    #: Read current versions with BatchGetSecretValue, up to 20 secrets per call.
    batch_reads: bool = True
    #: How long a due read waits for others to fill its batch (at most 2 % of its refreshInterval).
    batch_window: float = Field(default=1.0, ge=0, le=10)
    #: How long the caller identity (for status.identityArn) is cached.
    identity_cache_seconds: float = Field(default=600.0, ge=0)
    #: How long a read of a stale-but-valid value waits for AWS before serving what it has.
    serve_wait: float = Field(default=2.0, ge=0)
    #: ?refresh=true reads AWS at most once per credential per this gap; requests within it share the read.
    min_refresh_gap: float = Field(default=1.0, ge=0)
    #: From SIGTERM on, cached values are still served this long (the controller drains meanwhile).
    shutdown_drain: float = Field(default=5.0, ge=0)
    #: The declared credentials are listed again this often, besides after each re-list of the watch:
    #: a deletion no watch event reported (every credential deleted while the watch was down) is
    #: forgotten within this long.
    relist_interval: float = Field(default=900.0, ge=1)
    #: A check that changes nothing still refreshes status.lastCheckedTime, at most this often.
    status_heartbeat: float = Field(default=600.0, gt=0)

    #: First retry delay after a transient failure; doubles up to the cap.
    backoff_base: float = Field(default=1.0, gt=0)
    backoff_cap: float = Field(default=300.0, gt=0)
    #: Fraction of each interval drawn at random so that refreshes do not synchronise.
    jitter: float = Field(default=0.1, ge=0, le=0.5)

    #: An SQS queue that an EventBridge rule fills with Secrets Manager's "Secret Label Updated"
    #: events: a rotation is read at once instead of at the next refresh. Unset or empty: off.
    rotation_queue_url: str | None = None

    @field_validator("rotation_queue_url", mode="after")
    @classmethod
    def _rotation_queue_url(cls, value: str | None) -> str | None:
        url = (value or "").strip()
        if not url:
            return None
        scheme, _, rest = url.partition("://")
        path = rest.partition("/")[2].strip("/").split("/")
        if scheme not in ("https", "http") or not rest.partition("/")[0] or len(path) != 2 or not all(path):
            raise ValueError(
                f"{url!r} is not an SQS queue URL (https://sqs.<region>.amazonaws.com/<account-id>/<queue-name>)"
            )
        return url

    liveness: str | None = None
    #: Where /metrics listens (Prometheus text format): host:port, :port (every interface), or 0 (off).
    metrics_bind_address: str = ":8080"

    @field_validator("metrics_bind_address", mode="after")
    @classmethod
    def _metrics_bind_address(cls, value: str) -> str:
        parse_bind_address(value)  # raises ValueError: reported as an invalid setting
        return value.strip()

    #: The event loop: uvloop when it is installed (auto), the standard library's (asyncio), or uvloop required.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @field_validator("event_loop", mode="before")
    @classmethod
    def _event_loop(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    #: Watch requests ask the API server to end the stream after this long (then kopf re-watches),
    #: and give up client-side after the second: a silently stalled stream cannot freeze the operator.
    watch_server_timeout: float = Field(default=300.0, gt=0)
    watch_client_timeout: float = Field(default=330.0, gt=0)

    def watched_namespaces(self) -> list[str] | None:
        """The namespaces to watch: ``--namespace`` / ``CCRED_NAMESPACE``; ``None``: every namespace
        (``--all-namespaces``, or no namespace given)."""
        return None if self.all_namespaces or not self.namespace else list(self.namespace)

    @field_validator("namespace", mode="before")
    @classmethod
    def _namespaces(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("assumable_roles", mode="before")
    @classmethod
    def _roles(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("allowed_uids", mode="before")
    @classmethod
    def _uids(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> int:
        mode = int(value, 8) if isinstance(value, str) else int(value)
        if mode & 0o007:
            raise ValueError(f"socket mode {mode:04o} would let any local user read credentials; drop 'other' bits")
        if mode & ~0o770:
            raise ValueError(f"socket mode {mode:04o} is not a plain permission mode")
        return mode

    @field_validator(
        "backoff_base",
        "backoff_cap",
        "serve_wait",
        "identity_cache_seconds",
        "min_refresh_gap",
        "shutdown_drain",
        "status_heartbeat",
        "batch_window",
        "relist_interval",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        # Plain seconds or a duration with a unit (CCRED_BACKOFF_CAP=5s or =5).
        return parse_duration(value) if isinstance(value, str) and not _is_number(value) else value

    @field_validator("default_refresh_interval", "max_staleness", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        seconds = parse_duration(value) if isinstance(value, str) and not _is_number(value) else float(value)
        if seconds < MIN_REFRESH_SECONDS:
            raise ValueError(f"must be at least {MIN_REFRESH_SECONDS:g}s")
        return seconds


def parse_bind_address(address: str) -> tuple[str | None, int] | None:
    """``host:port``, ``:port`` (every interface) or ``[v6]:port``; ``0`` (or empty): off (``None``)."""
    text = address.strip()
    if text in ("", "0"):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{address!r} is not host:port, :port or 0")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{address!r}: the port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{address!r}: the port must be between 0 and 65535")
    return (host or None), port


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
