"""The AWS port: read a secret (or up to 20 in one call) and tell who we are, through the IRSA
credential chain.

:class:`SecretsPort` is what the engine needs; :class:`Boto3SecretsPort` implements it with
boto3 (synchronous: the reader calls it from its threads). How AWS's answers become condition
reasons is :mod:`connector_credentials.adapters.aws.errors`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from connector_credentials.adapters.aws.errors import classify, classify_error
from connector_credentials.adapters.aws.identity import (
    FULL_URI_ENV,
    IRSA,
    IRSA_METHOD,
    POD_IDENTITY,
    POD_IDENTITY_METHOD,
    ROLE_ENV,
    configured,
    from_retrieval_error,
    irsa_problem,
    neither_configured,
    pod_identity_failure,
    pod_identity_problem,
    source_name,
    token_problem_of,
)
from connector_credentials.adapters.aws.sessions import RoleSessions, new_session
from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.core.failures import IRSA_CHECKS, AwsFailure, scrub
from connector_credentials.core.ports import BATCH_LIMIT, PRIORITY_THREADS, BatchRefused, FetchedSecret

__all__ = ["Boto3SecretsPort", "irsa_problem"]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from connector_credentials.config.settings import OperatorSettings

_CURRENT = "stage AWSCURRENT"
_BATCH_REFUSALS = frozenset(
    {"AccessDeniedException", "AccessDenied", "UnknownOperationException", "InvalidAction", "NotImplemented"}
)


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
        self._source: str | None = None
        self._config = botocore.config.Config(
            connect_timeout=settings.aws_connect_timeout,
            read_timeout=settings.aws_read_timeout,
            retries={"mode": "standard", "total_max_attempts": settings.aws_max_attempts},
            # The batch threads and the priority lane's: no connection is ever discarded for lack of room.
            max_pool_connections=settings.aws_max_workers + PRIORITY_THREADS,
            user_agent_extra="connector-credential-operator",
        )
        self._roles = RoleSessions(
            lambda region: self._client("sts", region),
            self._config,
            instrument=instrument,
            own_failure=lambda exc, region: self._classify(
                exc, arn=_identity_placeholder(region), role=None, version=""
            ),
        )

    @property
    def role(self) -> str | None:
        return self._environ.get(ROLE_ENV) or None

    @property
    def credential_source(self) -> str | None:
        return self._source

    def _require_credentials(self) -> None:
        """Refuse anything but a workload identity (unless allowed), before boto3 resolves its chain:
        resolving it without one would fall back to the node's instance role."""
        allow_other = self._settings.allow_non_irsa_credentials
        kind = configured(self._environ)
        if kind == IRSA:
            problem = irsa_problem(self._environ)
            if problem is not None and not allow_other:
                raise AwsFailure(
                    Reason.IRSA_NOT_CONFIGURED,
                    f"No IRSA web-identity credentials: {problem}. {IRSA_CHECKS} Other credential sources (node "
                    "instance role, static keys) are refused unless CCRED_ALLOW_NON_IRSA_CREDENTIALS=true.",
                )
        elif kind == POD_IDENTITY:
            problem = pod_identity_problem(self._environ)
            if problem is not None:
                raise pod_identity_failure(problem, self._environ)
        elif not allow_other:
            raise neither_configured()
        session = self._get_session()
        try:
            credentials = session.get_credentials()
        except (botocore.exceptions.CredentialRetrievalError, ValueError) as exc:
            raise self._classify(exc, arn=_identity_placeholder("(credentials)"), role=None, version="") from None
        except OSError as exc:  # the Pod Identity token file vanished between the check and the read
            if kind != POD_IDENTITY:
                raise
            raise pod_identity_failure(f"the token could not be read ({exc.strerror})", self._environ) from None
        if credentials is None:
            raise neither_configured()
        method = getattr(credentials, "method", "unknown")
        expected = {IRSA: IRSA_METHOD, POD_IDENTITY: POD_IDENTITY_METHOD}.get(kind or "")
        if method != expected and not allow_other:
            variables = (
                f"{FULL_URI_ENV}/AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
                if kind == POD_IDENTITY
                else "AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE"
            )
            raise AwsFailure(
                Reason.IRSA_NOT_CONFIGURED,
                f"The AWS SDK picked credentials from {method!r}, not the workload identity "
                f"({'EKS Pod Identity' if kind == POD_IDENTITY else 'IRSA web identity'}): another source "
                "(e.g. AWS_ACCESS_KEY_ID in the container's environment, or a shared credentials file) "
                f"takes precedence over {variables}. Remove it, or set "
                "CCRED_ALLOW_NON_IRSA_CREDENTIALS=true to accept it.",
            )
        self._source = source_name(method)

    def _get_session(self) -> boto3.Session:
        with self._lock:
            if self._session is None:
                self._session = new_session()
            return self._session

    def queue_client(self, region: str, wait: float) -> Any:
        """The SQS client of this region (the rotation queue), with the workload identity checked
        first, as for every read; its read timeout allows a long poll of ``wait`` seconds."""
        self._require_credentials()
        config = self._config.merge(botocore.config.Config(read_timeout=wait + self._settings.aws_read_timeout))
        return self._client("sqs", region, config)

    def _client(self, service: str, region: str, config: botocore.config.Config | None = None) -> Any:
        key = (service, region)
        client = self._clients.get(key)
        if client is None:
            # Client creation is slow and not thread-safe: once per service and region.
            session = self._get_session()
            with self._lock:
                client = self._clients.get(key)
                if client is None:
                    client = session.client(service, region_name=region, config=config or self._config)  # type: ignore[call-overload]
                    if self._instrument is not None:
                        self._instrument(client)
                    self._clients[key] = client
        return client

    def _classify(self, exc: BaseException, *, arn: SecretArn, role: AssumedRole | None, version: str) -> AwsFailure:
        """:func:`classify`, with the Pod Identity agent's failures (also on renewal) in its own words."""
        if isinstance(exc, botocore.exceptions.CredentialRetrievalError):
            failure = from_retrieval_error(exc, self._environ)
            if failure is not None:
                return failure
        if isinstance(exc, ValueError) and (failure := token_problem_of(exc, self._environ)) is not None:
            return failure  # the token file was rewritten with a line break since it was checked
        return classify(exc, arn=arn, role=role.arn if role else self.role, version=version)

    def _reader(self, region: str, role: AssumedRole | None) -> Any:
        """The Secrets Manager client of this region, as the role if one is named."""
        if role is None:
            return self._client("secretsmanager", region)
        return self._roles.client(role, "secretsmanager", region, base_identity=self.role)

    def caller_identity(self, region: str, *, role: AssumedRole | None = None) -> str:
        self._require_credentials()
        if role is not None:
            # The assumed-role ARN comes with the session: no GetCallerIdentity for it.
            try:
                return self._roles.identity(role, region, base_identity=self.role)
            except AwsFailure:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
                raise self._classify(exc, arn=_identity_placeholder(region), role=role, version="") from None
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
        try:
            answer = self._client("sts", region).get_caller_identity()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            raise self._classify(exc, arn=_identity_placeholder(region), role=None, version="") from None
        identity = str(answer["Arn"])
        self._identity = (time.monotonic(), identity)
        return identity

    def get_secret(
        self, arn: SecretArn, *, version_id: str | None, version_stage: str | None, role: AssumedRole | None = None
    ) -> FetchedSecret:
        self._require_credentials()
        request: dict[str, str] = {"SecretId": arn.arn}
        if version_id:
            request["VersionId"] = version_id
        if version_stage:
            request["VersionStage"] = version_stage
        version = f"versionId {version_id}" if version_id else f"stage {version_stage}"
        try:
            answer = self._reader(arn.region, role).get_secret_value(**request)
        except AwsFailure:
            raise
        except Exception as exc:
            if not isinstance(exc, botocore.exceptions.ClientError | botocore.exceptions.BotoCoreError | OSError):
                logger.exception("Unexpected error reading %s", arn.arn)
            raise self._classify(exc, arn=arn, role=role, version=version) from None
        return _fetched(answer, arn, version)

    def get_current_secrets(
        self, region: str, arns: Sequence[SecretArn], *, role: AssumedRole | None = None
    ) -> dict[str, FetchedSecret | AwsFailure]:
        self._require_credentials()
        if len(arns) > BATCH_LIMIT:
            raise ValueError(f"at most {BATCH_LIMIT} secrets per batch")
        by_arn = {arn.arn: arn for arn in arns}
        by_name = {arn.name: arn for arn in arns}
        found: dict[str, FetchedSecret | AwsFailure] = {}
        request: dict[str, Any] = {"SecretIdList": list(by_arn)}
        client = self._reader(region, role)
        role_text = role.arn if role else self.role
        while True:
            try:
                answer = client.batch_get_secret_value(**request)
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # Denied by IAM, or an endpoint that does not know the action (a Secrets Manager stand-in).
                if code in _BATCH_REFUSALS:
                    raise BatchRefused(scrub(str(exc.response.get("Error", {}).get("Message", "")))) from None
                return {arn.arn: self._classify(exc, arn=arn, role=role, version=_CURRENT) for arn in arns}
            except Exception as exc:
                if not isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
                    logger.exception("Unexpected error reading a batch of %d secrets", len(arns))
                return {arn.arn: self._classify(exc, arn=arn, role=role, version=_CURRENT) for arn in arns}
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
                        role=role_text,
                        version=_CURRENT,
                    )
            token = answer.get("NextToken")
            if not token:
                return found
            request["NextToken"] = token


def _identity_placeholder(region: str) -> SecretArn:
    return SecretArn(arn="(identity)", partition="aws", region=region, account="", name="")


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
