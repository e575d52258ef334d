"""The ports: what the core needs from the outside world, as protocols the adapters implement.

* :class:`SecretsPort`: read secrets and tell who we are (the aws adapter implements it with boto3).
* :class:`~connector_credentials.core.status.StatusSink`: write a credential's status and events
  (the kube adapter), defined next to the status writer that uses it.
* :class:`Meter`: count what the engine and the socket do (the metrics adapter; :class:`NoMeter`
  for an engine built without one: ``doctor``, the unit tests).

Pure: no SDK, no HTTP, no Kubernetes client here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure

__all__ = [
    "BATCH_LIMIT",
    "PRIORITY_THREADS",
    "BatchRefused",
    "FetchedSecret",
    "Meter",
    "NoMeter",
    "SecretsPort",
]

#: BatchGetSecretValue takes at most this many ids per call.
BATCH_LIMIT = 20
#: Threads for reads someone waits for (the reader's priority lane), besides CCRED_AWS_MAX_WORKERS.
PRIORITY_THREADS = 2


@dataclass(frozen=True, slots=True)
class FetchedSecret:
    """What GetSecretValue returned. ``raw`` is the secret itself: keep it in memory only."""

    version_id: str
    raw: str | bytes
    stages: tuple[str, ...]

    def __repr__(self) -> str:
        return f"FetchedSecret(version_id={self.version_id!r}, raw=***, stages={self.stages!r})"


class SecretsPort(Protocol):
    """What the engine needs from AWS. Blocking: call from a worker thread.

    ``role``: read as this cross-account role (assumed with the workload identity), else as the
    workload identity itself.
    """

    @property
    def credential_source(self) -> str | None:
        """How the operator's own credentials were obtained (``IRSA``, ``PodIdentity``, a boto3
        method name), once known."""
        ...

    def caller_identity(self, region: str, *, role: AssumedRole | None = None) -> str:
        """The ARN STS reports for the credentials in use (raises :class:`AwsFailure`)."""
        ...

    def get_secret(
        self, arn: SecretArn, *, version_id: str | None, version_stage: str | None, role: AssumedRole | None = None
    ) -> FetchedSecret:
        """Read one secret version (raises :class:`AwsFailure`)."""
        ...

    def get_current_secrets(
        self, region: str, arns: Sequence[SecretArn], *, role: AssumedRole | None = None
    ) -> dict[str, FetchedSecret | AwsFailure]:
        """Read the current version of up to 20 secrets of one region in one call (BatchGetSecretValue).

        Keyed by ARN; a secret AWS did not mention is absent (read it alone). When the whole
        call failed (throttling, an outage), every secret gets that failure in its own words.
        Raises :class:`BatchRefused` when IAM denies the batch action itself, and
        :class:`AwsFailure` when there are no usable credentials.
        """
        ...


class BatchRefused(Exception):
    """IAM denies secretsmanager:BatchGetSecretValue: read one secret at a time instead."""


class Meter(Protocol):
    """What the engine and the socket count. Called on the event loop; must not block."""

    def status_written(self, result: str) -> None:
        """A status write ended (``ok``, ``conflict``, ``error``...)."""
        ...

    def socket_answered(self, code: int, seconds: float) -> None:
        """The socket answered a request with HTTP ``code`` after ``seconds``."""
        ...

    def rotation_event(self, outcome: str) -> None:
        """A message from the rotation queue was handled (the outcomes of core/rotation.py)."""
        ...

    def rotation_delivered(self, seconds: float) -> None:
        """The version a rotation event named is served, ``seconds`` after the event was published."""
        ...

    def rotation_queue(self, problem: str | None, *, receive: bool = True) -> None:
        """A call to the rotation queue succeeded (``None``) or failed (``denied``, ``missing``, ...);
        only a receive says whether events arrive (``receive=False``: a delete)."""
        ...


class NoMeter:
    """Counts nothing: the meter of an engine built without one."""

    def status_written(self, result: str) -> None:
        pass

    def socket_answered(self, code: int, seconds: float) -> None:
        pass

    def rotation_event(self, outcome: str) -> None:
        pass

    def rotation_delivered(self, seconds: float) -> None:
        pass

    def rotation_queue(self, problem: str | None, *, receive: bool = True) -> None:
        pass
