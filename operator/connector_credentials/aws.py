"""The AWS port: read a secret (or up to 20 in one call) and tell who we are, through the IRSA
credential chain.

:class:`SecretsPort` is what the engine needs; :class:`Boto3SecretsPort` implements it with
boto3 (synchronous: the reader calls it from its threads). How AWS's answers become condition
reasons is :mod:`connector_credentials.awserrors`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import boto3
import botocore.config
import botocore.exceptions

from connector_credentials.awserrors import (
    IRSA_CHECKS,
    MAX_AWS_MESSAGE,
    AwsFailure,
    classify,
    classify_error,
    scrub,
)
from connector_credentials.conditions import Reason
from connector_credentials.models import SecretArn

__all__ = [
    "BATCH_LIMIT",
    "IRSA_CHECKS",
    "MAX_AWS_MESSAGE",
    "AwsFailure",
    "BatchRefused",
    "Boto3SecretsPort",
    "FetchedSecret",
    "SecretsPort",
    "classify",
    "classify_error",
    "irsa_problem",
    "scrub",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from connector_credentials.settings import OperatorSettings

IRSA_METHOD = "assume-role-with-web-identity"
ROLE_ENV = "AWS_ROLE_ARN"
TOKEN_ENV = "AWS_WEB_IDENTITY_TOKEN_FILE"
#: BatchGetSecretValue takes at most this many ids per call.
BATCH_LIMIT = 20
#: Threads for reads someone waits for (the reader's priority lane), besides CCRED_AWS_MAX_WORKERS.
PRIORITY_THREADS = 2
_CURRENT = "stage AWSCURRENT"
_BATCH_REFUSALS = frozenset(
    {"AccessDeniedException", "AccessDenied", "UnknownOperationException", "InvalidAction", "NotImplemented"}
)

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")


@dataclass(frozen=True, slots=True)
class FetchedSecret:
    """What GetSecretValue returned. ``raw`` is the secret itself: keep it in memory only."""

    version_id: str
    raw: str | bytes
    stages: tuple[str, ...]

    def __repr__(self) -> str:
        return f"FetchedSecret(version_id={self.version_id!r}, raw=***, stages={self.stages!r})"


class SecretsPort(Protocol):
    """What the engine needs from AWS. Blocking: call from a worker thread."""

    def caller_identity(self, region: str) -> str:
        """The ARN STS reports for the credentials in use (raises :class:`AwsFailure`)."""
        ...

    def get_secret(self, arn: SecretArn, *, version_id: str | None, version_stage: str | None) -> FetchedSecret:
        """Read one secret version (raises :class:`AwsFailure`)."""
        ...

    def get_current_secrets(self, region: str, arns: Sequence[SecretArn]) -> dict[str, FetchedSecret | AwsFailure]:
        """Read the current version of up to 20 secrets of one region in one call (BatchGetSecretValue).

        Keyed by ARN; a secret AWS did not mention is absent (read it alone). When the whole
        call failed (throttling, an outage), every secret gets that failure in its own words.
        Raises :class:`BatchRefused` when IAM denies the batch action itself, and
        :class:`AwsFailure` when there are no usable credentials.
        """
        ...


class BatchRefused(Exception):
    """IAM denies secretsmanager:BatchGetSecretValue: read one secret at a time instead."""


def irsa_problem(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Why the pod has no usable web-identity setup, or ``None`` when it has one."""
    missing = [name for name in (ROLE_ENV, TOKEN_ENV) if not environ.get(name)]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set in the operator's container"
    role = environ[ROLE_ENV]
    if not _ROLE_ARN.match(role):
        return (
            f"AWS_ROLE_ARN={role!r} is not an IAM role ARN (arn:aws:iam::<account-id>:role/<name>); "
            "the service account annotation eks.amazonaws.com/role-arn must hold the full role ARN"
        )
    token_file = environ[TOKEN_ENV]
    try:
        with open(token_file, "rb") as handle:
            if not handle.read(1):
                return f"the web-identity token file {token_file} is empty"
    except OSError as exc:
        return f"the web-identity token file {token_file} cannot be read ({exc.strerror or type(exc).__name__})"
    return None


class Boto3SecretsPort:
    """The port over boto3's default credential chain, insisting on IRSA unless allowed otherwise."""

    def __init__(
        self,
        settings: OperatorSettings,
        environ: dict[str, str] | None = None,
        *,
        instrument: Callable[[Any], None] | None = None,
    ) -> None:
        self._settings = settings
        #: Called with every new boto3 client (the metrics register their event hooks on it).
        self._instrument = instrument
        self._environ = environ if environ is not None else dict(os.environ)
        self._lock = threading.Lock()
        self._session: boto3.Session | None = None
        self._clients: dict[tuple[str, str], Any] = {}
        self._identity: tuple[float, str] | None = None
        self._identity_lock = threading.Lock()
        self._identity_flight: concurrent.futures.Future[str] | None = None
        self._config = botocore.config.Config(
            connect_timeout=settings.aws_connect_timeout,
            read_timeout=settings.aws_read_timeout,
            retries={"mode": "standard", "total_max_attempts": settings.aws_max_attempts},
            # The batch threads and the priority lane's: no connection is ever discarded for lack of room.
            max_pool_connections=settings.aws_max_workers + PRIORITY_THREADS,
            user_agent_extra="connector-credential-operator",
        )

    @property
    def role(self) -> str | None:
        return self._environ.get(ROLE_ENV) or None

    def _require_credentials(self) -> None:
        problem = irsa_problem(self._environ)
        if problem is not None and not self._settings.allow_non_irsa_credentials:
            # Refuse before resolving the chain: resolving it would fall back to the node's role.
            raise AwsFailure(
                Reason.IRSA_NOT_CONFIGURED,
                f"No IRSA web-identity credentials: {problem}. {IRSA_CHECKS} Other credential sources (node "
                "instance role, static keys) are refused unless CCRED_ALLOW_NON_IRSA_CREDENTIALS=true.",
            )
        session = self._get_session()
        credentials = session.get_credentials()
        if credentials is None:
            raise AwsFailure(Reason.IRSA_NOT_CONFIGURED, f"No AWS credentials were found. {IRSA_CHECKS}")
        method = getattr(credentials, "method", "unknown")
        if method != IRSA_METHOD and not self._settings.allow_non_irsa_credentials:
            raise AwsFailure(
                Reason.IRSA_NOT_CONFIGURED,
                f"The AWS SDK picked credentials from {method!r}, not IRSA web identity: another source "
                "(e.g. AWS_ACCESS_KEY_ID in the container's environment, or a shared credentials file) "
                "takes precedence over AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE. Remove it, or set "
                "CCRED_ALLOW_NON_IRSA_CREDENTIALS=true to accept it.",
            )

    def _get_session(self) -> boto3.Session:
        with self._lock:
            if self._session is None:
                self._session = boto3.Session()
            return self._session

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        client = self._clients.get(key)
        if client is None:
            # Client creation is slow and not thread-safe: once per service and region.
            session = self._get_session()
            with self._lock:
                client = self._clients.get(key)
                if client is None:
                    client = session.client(service, region_name=region, config=self._config)  # type: ignore[call-overload]
                    if self._instrument is not None:
                        self._instrument(client)
                    self._clients[key] = client
        return client

    def caller_identity(self, region: str) -> str:
        self._require_credentials()
        with self._identity_lock:
            cached = self._identity
            if cached is not None and time.monotonic() - cached[0] < self._settings.identity_cache_seconds:
                return cached[1]
            # One thread asks STS; the threads that ask meanwhile share its answer (or its failure).
            flight, asking = self._identity_flight, self._identity_flight is None
            if flight is None:
                flight = self._identity_flight = concurrent.futures.Future()
        if not asking:
            try:
                return str(flight.result())
            except AwsFailure as failure:  # a copy: one exception object must not be raised in two threads
                raise AwsFailure(failure.reason, failure.message, transient=failure.transient) from None
        try:
            identity = self._ask_identity(region)
        except AwsFailure as failure:
            flight.set_exception(failure)
            raise
        else:
            flight.set_result(identity)
            return identity
        finally:
            with self._identity_lock:
                self._identity_flight = None

    def _ask_identity(self, region: str) -> str:
        placeholder = SecretArn(arn="(identity)", partition="aws", region=region, account="", name="")
        try:
            answer = self._client("sts", region).get_caller_identity()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            raise classify(exc, arn=placeholder, role=self.role, version="") from None
        identity = str(answer["Arn"])
        self._identity = (time.monotonic(), identity)
        return identity

    def get_secret(self, arn: SecretArn, *, version_id: str | None, version_stage: str | None) -> FetchedSecret:
        self._require_credentials()
        request: dict[str, str] = {"SecretId": arn.arn}
        if version_id:
            request["VersionId"] = version_id
        if version_stage:
            request["VersionStage"] = version_stage
        version = f"versionId {version_id}" if version_id else f"stage {version_stage}"
        try:
            answer = self._client("secretsmanager", arn.region).get_secret_value(**request)
        except Exception as exc:
            if not isinstance(exc, botocore.exceptions.ClientError | botocore.exceptions.BotoCoreError | OSError):
                logger.exception("Unexpected error reading %s", arn.arn)
            raise classify(exc, arn=arn, role=self.role, version=version) from None
        return _fetched(answer, arn, version)

    def get_current_secrets(self, region: str, arns: Sequence[SecretArn]) -> dict[str, FetchedSecret | AwsFailure]:
        self._require_credentials()
        if len(arns) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} secrets per batch")
        by_arn = {arn.arn: arn for arn in arns}
        by_name = {arn.name: arn for arn in arns}
        found: dict[str, FetchedSecret | AwsFailure] = {}
        request: dict[str, Any] = {"SecretIdList": list(by_arn)}
        client = self._client("secretsmanager", region)
        while True:
            try:
                answer = client.batch_get_secret_value(**request)
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # Denied by IAM, or an endpoint that does not know the action (a Secrets Manager stand-in).
                if code in _BATCH_REFUSALS:
                    raise BatchRefused(scrub(str(exc.response.get("Error", {}).get("Message", "")))) from None
                return {arn.arn: classify(exc, arn=arn, role=self.role, version=_CURRENT) for arn in arns}
            except Exception as exc:
                if not isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
                    logger.exception("Unexpected error reading a batch of %d secrets", len(arns))
                return {arn.arn: classify(exc, arn=arn, role=self.role, version=_CURRENT) for arn in arns}
            for item in answer.get("SecretValues") or ():
                # Answers name the secret by its full ARN; match by name too, for an ARN given without suffix.
                arn = by_arn.get(str(item.get("ARN", ""))) or by_name.get(str(item.get("Name", "")))
                if arn is not None:
                    try:
                        found[arn.arn] = _fetched(item, arn, _CURRENT)
                    except AwsFailure as failure:
                        found[arn.arn] = failure
            for error in answer.get("Errors") or ():
                arn = by_arn.get(str(error.get("SecretId", ""))) or by_name.get(str(error.get("SecretId", "")))
                if arn is not None and arn.arn not in found:
                    found[arn.arn] = classify_error(
                        str(error.get("ErrorCode", "Unknown")),
                        str(error.get("Message", "")),
                        status=400,
                        operation="GetSecretValue",
                        arn=arn,
                        role=self.role,
                        version=_CURRENT,
                    )
            token = answer.get("NextToken")
            if not token:
                return found
            request["NextToken"] = token


def _fetched(answer: dict[str, Any], arn: SecretArn, version: str) -> FetchedSecret:
    """A FetchedSecret from a GetSecretValue answer or one entry of a batch answer."""
    raw: str | bytes
    if answer.get("SecretString") is not None:
        raw = answer["SecretString"]
    elif answer.get("SecretBinary") is not None:
        raw = bytes(answer["SecretBinary"])
    else:
        raise AwsFailure(Reason.SECRET_NOT_FOUND, f"Secret {arn.arn} has no value in {version}.")
    return FetchedSecret(
        version_id=str(answer.get("VersionId", "")),
        raw=raw,
        stages=tuple(answer.get("VersionStages", ())),
    )
