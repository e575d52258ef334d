import botocore.exceptions
import pytest

from connector_credentials.adapters.aws.errors import classify
from connector_credentials.adapters.aws.secrets import irsa_problem
from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import SecretArn
from connector_credentials.core.failures import AwsFailure, scrub

ARN = SecretArn.parse("arn:aws:secretsmanager:eu-west-1:123456789012:secret:xpander/prod/slack-AbCdEf")
ROLE = "arn:aws:iam::123456789012:role/xpander-controller"


def client_error(code: str, message: str, operation: str = "GetSecretValue", status: int = 400) -> Exception:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def verdict(exc: BaseException, version: str = "stage AWSCURRENT") -> AwsFailure:
    return classify(exc, arn=ARN, role=ROLE, version=version)


@pytest.mark.parametrize(
    ("exc", "reason", "must_say"),
    [
        (
            client_error(
                "AccessDeniedException", "User: x is not authorized to perform: secretsmanager:GetSecretValue"
            ),
            Reason.ACCESS_DENIED,
            [ROLE, ARN.arn, "secretsmanager:GetSecretValue", "-??????"],
        ),
        (
            client_error("AccessDeniedException", "Access to KMS is not allowed"),
            Reason.ACCESS_DENIED,
            [ROLE, "kms:Decrypt"],
        ),
        (
            client_error("ResourceNotFoundException", "Secrets Manager can't find the specified secret."),
            Reason.SECRET_NOT_FOUND,
            ["eu-west-1", "case-sensitive", "123456789012", "xpander/prod/slack-AbCdEf"],
        ),
        (
            client_error(
                "ResourceNotFoundException", "Secrets Manager can't find the specified secret value for VersionId: x"
            ),
            Reason.SECRET_NOT_FOUND,
            ["has no version", "versionStage"],
        ),
        (
            client_error(
                "InvalidRequestException",
                "You can't perform this operation on the secret because it was marked for deletion.",
            ),
            Reason.SECRET_SCHEDULED_FOR_DELETION,
            ["restore-secret", "eu-west-1"],
        ),
        (
            client_error("DecryptionFailure", "Secrets Manager can't decrypt the protected secret text"),
            Reason.DECRYPTION_FAILED,
            ["KMS key", ROLE],
        ),
        (
            client_error(
                "AccessDenied",
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                "AssumeRoleWithWebIdentity",
                403,
            ),
            Reason.ASSUME_ROLE_FAILED,
            [ROLE, "trust policy", "sts.amazonaws.com", "system:serviceaccount:"],
        ),
        (
            client_error("InvalidIdentityToken", "No OpenIDConnect provider found", "AssumeRoleWithWebIdentity"),
            Reason.ASSUME_ROLE_FAILED,
            ["OIDC provider"],
        ),
        (client_error("ThrottlingException", "Rate exceeded"), Reason.THROTTLED, ["backs off"]),
        (client_error("ThrottlingException", "Rate exceeded", "AssumeRoleWithWebIdentity"), Reason.THROTTLED, []),
        (client_error("InternalServiceError", "oops", status=500), Reason.AWS_UNAVAILABLE, ["eu-west-1"]),
        (client_error("Weird", "bad gateway", status=502), Reason.AWS_UNAVAILABLE, []),
        (client_error("InvalidParameterException", "bad version"), Reason.INVALID_SPEC, []),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="https://x"), Reason.AWS_UNAVAILABLE, ["eu-west-1"]),
        (
            botocore.exceptions.ReadTimeoutError(endpoint_url="https://x", error="timed out"),
            Reason.AWS_UNAVAILABLE,
            [],
        ),
        (botocore.exceptions.NoCredentialsError(), Reason.IRSA_NOT_CONFIGURED, ["eks.amazonaws.com/role-arn"]),
        (RuntimeError("surprise"), Reason.AWS_UNAVAILABLE, ["RuntimeError"]),
    ],
)
def test_errors_map_to_reasons_with_actionable_messages(exc: Exception, reason: Reason, must_say: list[str]) -> None:
    failure = verdict(exc)
    assert failure.reason == reason
    assert failure.transient == reason.transient
    for text in must_say:
        assert text in failure.message


def test_transient_reasons_are_exactly_throttled_and_unavailable() -> None:
    assert {r for r in Reason if r.transient} == {Reason.THROTTLED, Reason.AWS_UNAVAILABLE}


def test_scrub_strips_request_ids_and_credentials() -> None:
    text = (
        "denied (Request ID: 4442587FB7D0A2F9) Credential=AKIAEXAMPLE/20260101/us-east-1 Signature=abc123 "
        "X-Amz-Security-Token=FwoGZX"
    )
    cleaned = scrub(text)
    for secret in ("4442587FB7D0A2F9", "AKIAEXAMPLE", "abc123", "FwoGZX"):
        assert secret not in cleaned
    assert len(scrub("x" * 1000)) == 600


def test_irsa_problem_names_missing_variables(tmp_path: pytest.TempPathFactory) -> None:
    assert "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE are not set" in (irsa_problem({}) or "")
    assert "AWS_WEB_IDENTITY_TOKEN_FILE is not set" in (irsa_problem({"AWS_ROLE_ARN": ROLE}) or "")
    missing = irsa_problem({"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": "/nonexistent/token"})
    assert missing is not None and "cannot be read" in missing


def test_irsa_problem_accepts_a_readable_token(tmp_path: object) -> None:
    import pathlib

    token = pathlib.Path(str(tmp_path)) / "token"
    token.write_text("")
    env = {"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token)}
    assert "is empty" in (irsa_problem(env) or "")
    token.write_text("eyJ...")
    assert irsa_problem(env) is None


def test_a_missing_staging_label_is_reported_as_a_version_problem() -> None:
    failure = verdict(
        client_error(
            "ResourceNotFoundException",
            "Secrets Manager can't find the specified secret value for staging label: AWSPREVIOUS",
        ),
        version="stage AWSPREVIOUS",
    )
    assert failure.reason == Reason.SECRET_NOT_FOUND
    assert "has no version stage AWSPREVIOUS" in failure.message


def test_a_bare_role_name_is_irsa_not_configured(tmp_path: object) -> None:
    import pathlib

    token = pathlib.Path(str(tmp_path)) / "token"
    token.write_text("eyJ...")
    problem = irsa_problem({"AWS_ROLE_ARN": "xpander-controller", "AWS_WEB_IDENTITY_TOKEN_FILE": str(token)})
    assert problem is not None and "not an IAM role ARN" in problem


def test_session_names_are_scrubbed_so_replicas_agree() -> None:
    a = scrub("User: arn:aws:sts::123456789012:assumed-role/xpander-controller/botocore-session-1 is not authorized")
    b = scrub("User: arn:aws:sts::123456789012:assumed-role/xpander-controller/botocore-session-2 is not authorized")
    assert a == b
    assert "assumed-role/xpander-controller is not authorized" in a


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            client_error("ExpiredTokenException", "Token expired", "AssumeRoleWithWebIdentity"),
            Reason.ASSUME_ROLE_FAILED,
        ),
        (
            client_error("ExpiredToken", "The security token included in the request is expired", "GetCallerIdentity"),
            Reason.ASSUME_ROLE_FAILED,
        ),
        (
            client_error("ExpiredTokenException", "The security token included in the request is expired"),
            Reason.AWS_UNAVAILABLE,
        ),
    ],
)
def test_an_expired_token_is_transient_and_says_so(exc: Exception, reason: Reason) -> None:
    failure = verdict(exc)
    assert (failure.reason, failure.transient) == (reason, True)
    assert "token had expired" in failure.message and "retries soon" in failure.message
    assert "projected service-account token" in failure.message


@pytest.mark.parametrize(
    "exc",
    [
        client_error("InvalidSignatureException", "The request signature we calculated does not match"),
        client_error(
            "SignatureDoesNotMatch",
            "Signature not yet current: 20260101T000000Z is still later than ...",
            "GetCallerIdentity",
        ),
        client_error("InvalidSignatureException", "Signature expired: 20200101T000000Z is now earlier than ..."),
        client_error(
            "RequestTimeTooSkewed", "The difference between the request time and the current time is too large"
        ),
    ],
)
def test_signature_refusals_name_clock_skew(exc: Exception) -> None:
    failure = verdict(exc)
    assert failure.reason == Reason.AWS_UNAVAILABLE and failure.transient
    assert "clock skew" in failure.message and "chronyc" in failure.message


def test_unrecognized_client_names_credentials_aws_does_not_know() -> None:
    failure = verdict(
        client_error("UnrecognizedClientException", "The security token included in the request is invalid")
    )
    assert (failure.reason, failure.transient) == (Reason.ASSUME_ROLE_FAILED, False)
    assert "does not recognise the credentials" in failure.message
    assert "AWS_STS_REGIONAL_ENDPOINTS=regional" in failure.message
