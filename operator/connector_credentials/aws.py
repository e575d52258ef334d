"""The AWS port: read a secret and tell who we are, through the IRSA credential chain.

:class:`SecretsPort` is what the engine needs; :class:`Boto3SecretsPort` implements it
with boto3 (synchronous: the engine calls it from a bounded thread pool).
:func:`classify` turns SDK errors into condition reasons with actionable messages.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import boto3
import botocore.config
import botocore.exceptions

from connector_credentials.conditions import Reason
from connector_credentials.models import SecretArn

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from connector_credentials.settings import OperatorSettings

IRSA_METHOD = "assume-role-with-web-identity"
ROLE_ENV = "AWS_ROLE_ARN"
TOKEN_ENV = "AWS_WEB_IDENTITY_TOKEN_FILE"
MAX_AWS_MESSAGE = 600
#: BatchGetSecretValue takes at most this many ids per call.
BATCH_LIMIT = 20
_CURRENT = "stage AWSCURRENT"
_BATCH_REFUSALS = frozenset(
    {"AccessDeniedException", "AccessDenied", "UnknownOperationException", "InvalidAction", "NotImplemented"}
)

_THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "PriorRequestNotComplete",
    }
)
_UNAVAILABLE_CODES = frozenset(
    {
        "InternalServiceError",
        "InternalServiceErrorException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "IDPCommunicationError",
    }
)
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")
_STS_OPERATIONS = frozenset({"AssumeRoleWithWebIdentity", "GetCallerIdentity"})
_STS_REFUSALS = frozenset(
    {
        "AccessDenied",
        "InvalidIdentityToken",
        "ExpiredTokenException",
        "ExpiredToken",
        "IDPRejectedClaim",
        "InvalidClientTokenId",
        "MalformedPolicyDocument",
        "RegionDisabledException",
    }
)
_SCRUB = (
    (re.compile(r"\s*\(?Request ?ID:? ?[A-Za-z0-9-]+\)?", re.IGNORECASE), ""),
    (re.compile(r"Credential=[^\s,]+"), "Credential=<redacted>"),
    (re.compile(r"Signature=[^\s,]+"), "Signature=<redacted>"),
    (re.compile(r"(X-Amz-Security-Token|SessionToken)[=:]\s*[^\s,]+", re.IGNORECASE), r"\1=<redacted>"),
    # The STS session name differs per replica and per refresh; without it, replicas agree.
    (re.compile(r"(:assumed-role/[\w+=,.@-]+)/[\w+=,.@-]+"), r"\1"),
)


@dataclass(frozen=True, slots=True)
class FetchedSecret:
    """What GetSecretValue returned. ``raw`` is the secret itself: keep it in memory only."""

    version_id: str
    raw: str | bytes
    stages: tuple[str, ...]

    def __repr__(self) -> str:
        return f"FetchedSecret(version_id={self.version_id!r}, raw=***, stages={self.stages!r})"


class AwsFailure(Exception):
    """A check failed; ``reason`` is the condition reason, ``message`` says what to fix."""

    def __init__(self, reason: Reason, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Usually the reason decides; a few answers (an expired token) name a reason that is
        # normally final but clear up by themselves, and are retried soon.
        self._transient = transient

    @property
    def transient(self) -> bool:
        return self.reason.transient if self._transient is None else self._transient


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


def scrub(text: str) -> str:
    """Strip request IDs and anything credential-like from an AWS message; bound its length."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_AWS_MESSAGE else text[: MAX_AWS_MESSAGE - 3] + "..."


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


IRSA_CHECKS = (
    "Check that the pod's service account is annotated eks.amazonaws.com/role-arn with the full role ARN "
    "(arn:aws:iam::<account-id>:role/<name>), that the pod was restarted after the annotation was added "
    "(IRSA is injected only at pod creation), and that the EKS cluster has an IAM OIDC provider "
    "(aws eks describe-cluster --query cluster.identity.oidc.issuer)."
)


def classify(exc: BaseException, *, arn: SecretArn, role: str | None, version: str) -> AwsFailure:
    """Map an SDK exception to a reason and a message that says what to check next."""
    role_text = role or "(no role: AWS_ROLE_ARN is unset)"
    if isinstance(exc, AwsFailure):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_error(
            str(error.get("Code", "Unknown")),
            str(error.get("Message", "")),
            status=status,
            operation=exc.operation_name,
            arn=arn,
            role=role,
            version=version,
        )
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AwsFailure(Reason.IRSA_NOT_CONFIGURED, f"No AWS credentials were found. {IRSA_CHECKS}")
    if isinstance(exc, botocore.exceptions.CredentialRetrievalError | botocore.exceptions.InvalidConfigError):
        return AwsFailure(
            Reason.ASSUME_ROLE_FAILED,
            f"Could not obtain credentials for role {role_text}: {scrub(str(exc))}",
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        # Connection failures, timeouts, endpoint resolution: all transient.
        return AwsFailure(
            Reason.AWS_UNAVAILABLE,
            f"Could not reach AWS for {arn.arn} in {arn.region}: {type(exc).__name__}: {scrub(str(exc))}. "
            "The operator backs off and retries.",
        )
    return AwsFailure(
        Reason.AWS_UNAVAILABLE, f"Unexpected error reading {arn.arn}: {type(exc).__name__}; see the operator's log"
    )


def classify_error(
    code: str, message: str, *, status: int, operation: str, arn: SecretArn, role: str | None, version: str
) -> AwsFailure:
    """Map an AWS error code and message (a ClientError, or one secret's entry in a batch answer)."""
    role_text = role or "(no role: AWS_ROLE_ARN is unset)"
    aws_said = scrub(message)
    said = f" AWS said: {code}: {aws_said}" if aws_said else f" AWS said: {code}"
    if special := _credential_problem(code, aws_said, said, operation, arn=arn, role=role_text):
        return special
    if operation in _STS_OPERATIONS and code not in _THROTTLE_CODES | _UNAVAILABLE_CODES:
        return AwsFailure(
            Reason.ASSUME_ROLE_FAILED,
            f"STS refused {operation} for role {role_text}.{said} Check the role's trust policy: "
            "it must trust the cluster's OIDC provider (a Federated principal) with the conditions "
            "<issuer>:sub = system:serviceaccount:<namespace>:<service-account> and "
            "<issuer>:aud = sts.amazonaws.com; that this OIDC provider exists in IAM in the role's "
            "account; and that the projected token is current.",
        )
    if code in _THROTTLE_CODES or status == 429:
        return AwsFailure(
            Reason.THROTTLED,
            f"AWS throttled the request for {arn.arn} in {arn.region} and retries did not get through.{said} "
            "The operator backs off and retries; raise refreshInterval or the account's quota if it persists.",
        )
    if code in _UNAVAILABLE_CODES or status >= 500:
        return AwsFailure(
            Reason.AWS_UNAVAILABLE,
            f"Secrets Manager in {arn.region} failed to answer for {arn.arn}.{said} "
            "The operator backs off and retries.",
        )
    if code in ("AccessDeniedException", "AccessDenied"):
        kms = "kms" in aws_said.lower()
        what = "KMS denied the decryption of" if kms else "Secrets Manager denied secretsmanager:GetSecretValue on"
        fix = (
            f"Check that role {role_text} may kms:Decrypt with the secret's KMS key (in the key policy and "
            "the role's policy) and that the key is enabled."
            if kms
            else "Check that the role's IAM policy allows secretsmanager:GetSecretValue on this exact ARN "
            "(or a pattern that matches its 6-character suffix, e.g. ...:secret:<name>-??????), and that "
            "no resource policy on the secret or SCP denies it."
        )
        said = said if said.endswith(".") else f"{said}."
        return AwsFailure(Reason.ACCESS_DENIED, f"{what} {arn.arn} for role {role_text}.{said} {fix}")
    if code == "ResourceNotFoundException":
        if any(word in aws_said.lower() for word in ("version", "stage", "staging label")):
            detail = f"Secret {arn.name!r} exists in {arn.region} but has no version {version}."
            fix = "Check spec.versionId / spec.versionStage against `aws secretsmanager list-secret-version-ids`."
        else:
            detail = f"No secret named {arn.name!r} in account {arn.account}, region {arn.region}."
            fix = (
                "Check that the secret exists in that region (the region is taken from the ARN, not "
                "from the cluster), that its name matches exactly (names are case-sensitive), and that the "
                "ARN includes the 6-character suffix AWS appends to the name."
            )
        return AwsFailure(Reason.SECRET_NOT_FOUND, f"{detail}{said} {fix}")
    if code == "InvalidRequestException" and "delet" in aws_said.lower():
        return AwsFailure(
            Reason.SECRET_SCHEDULED_FOR_DELETION,
            f"Secret {arn.arn} is scheduled for deletion.{said} Restore it with "
            f"`aws secretsmanager restore-secret --region {arn.region} --secret-id {arn.arn}`, "
            "or point spec.secretArn at another secret.",
        )
    if code in ("DecryptionFailure", "DecryptionFailureException"):
        return AwsFailure(
            Reason.DECRYPTION_FAILED,
            f"KMS could not decrypt {arn.arn}.{said} Check that the secret's KMS key is enabled and not "
            f"pending deletion, and that role {role_text} may kms:Decrypt with it.",
        )
    if code in ("InvalidParameterException", "ValidationException", "InvalidRequestException"):
        return AwsFailure(
            Reason.INVALID_SPEC,
            f"Secrets Manager rejected the request for {arn.arn} ({version}).{said} Check the spec's fields.",
        )
    return AwsFailure(Reason.AWS_UNAVAILABLE, f"Unexpected AWS error for {arn.arn}.{said}")


_EXPIRED_TOKEN_CODES = frozenset({"ExpiredTokenException", "ExpiredToken", "RequestExpired"})
_SIGNATURE_CODES = frozenset({"InvalidSignatureException", "SignatureDoesNotMatch"})
_CLOCK_SKEW = re.compile(r"clock|skew|signature expired|not yet current|too skewed", re.IGNORECASE)


def _credential_problem(
    code: str, aws_said: str, said: str, operation: str, *, arn: SecretArn, role: str
) -> AwsFailure | None:
    """Answers about the credentials themselves, which need words of their own."""
    if code in _EXPIRED_TOKEN_CODES:
        # Usually the kubelet refreshing the projected token a little late, or a session that
        # expired a moment before the SDK renewed it: it clears up by itself.
        return AwsFailure(
            Reason.ASSUME_ROLE_FAILED if operation in _STS_OPERATIONS else Reason.AWS_UNAVAILABLE,
            f"AWS refused {operation} for role {role} because a token had expired.{said} This usually clears "
            "up by itself (the kubelet refreshes the projected token, the SDK renews the session); the operator "
            "keeps serving the value verified before and retries soon. If it persists, check that the pod's "
            "projected service-account token is mounted and refreshed (AWS_WEB_IDENTITY_TOKEN_FILE) and that "
            "the node's clock is right.",
            transient=True,
        )
    if code == "RequestTimeTooSkewed" or code in _SIGNATURE_CODES or _CLOCK_SKEW.search(aws_said):
        return AwsFailure(
            Reason.AWS_UNAVAILABLE,
            f"AWS refused the signature of {operation} for {arn.arn}.{said} This is almost always clock skew: "
            "the node's clock differs from AWS's by more than 5 minutes. Check time sync on the node "
            "(chronyd / Amazon Time Sync Service, `chronyc tracking`). The operator retries with backoff.",
            transient=True,
        )
    if code == "UnrecognizedClientException":
        return AwsFailure(
            Reason.ASSUME_ROLE_FAILED,
            f"AWS does not recognise the credentials used for {operation} on {arn.arn} (role {role}).{said} "
            "Check that no static keys (AWS_ACCESS_KEY_ID, a credentials file) override the pod's role, that the "
            f"region {arn.region} is enabled in the account (opt-in regions reject tokens from the global STS "
            "endpoint: set AWS_STS_REGIONAL_ENDPOINTS=regional), and that the ARN's partition matches.",
        )
    return None


class Boto3SecretsPort:
    """The port over boto3's default credential chain, insisting on IRSA unless allowed otherwise."""

    def __init__(self, settings: OperatorSettings, environ: dict[str, str] | None = None) -> None:
        self._settings = settings
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
            max_pool_connections=settings.aws_max_workers,
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
