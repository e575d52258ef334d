"""AWS answers in the words of a condition: each SDK error or batch ``Errors[]`` entry becomes a
:class:`~connector_credentials.core.failures.AwsFailure` with a reason and a message that says what to
check next, scrubbed of request IDs and anything credential-like
(:func:`~connector_credentials.core.failures.scrub`)."""

from __future__ import annotations

import re

import botocore.exceptions

from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import SecretArn
from connector_credentials.core.failures import (
    IRSA_CHECKS,
    MAX_AWS_MESSAGE,
    THROTTLE_CODES,
    AwsFailure,
    scrub,
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
_STS_OPERATIONS = frozenset({"AssumeRoleWithWebIdentity", "GetCallerIdentity"})

__all__ = ["IRSA_CHECKS", "MAX_AWS_MESSAGE", "THROTTLE_CODES", "AwsFailure", "classify", "classify_error", "scrub"]


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
    if operation in _STS_OPERATIONS and code not in THROTTLE_CODES | _UNAVAILABLE_CODES:
        return AwsFailure(
            Reason.ASSUME_ROLE_FAILED,
            f"STS refused {operation} for role {role_text}.{said} Check the role's trust policy: "
            "it must trust the cluster's OIDC provider (a Federated principal) with the conditions "
            "<issuer>:sub = system:serviceaccount:<namespace>:<service-account> and "
            "<issuer>:aud = sts.amazonaws.com; that this OIDC provider exists in IAM in the role's "
            "account; and that the projected token is current.",
        )
    if code in THROTTLE_CODES or status == 429:
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
