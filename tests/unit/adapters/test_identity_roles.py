"""Workload identity detection (IRSA / Pod Identity), the role allowlist, and the role session cache."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from connector_credentials.adapters.aws import identity
from connector_credentials.adapters.aws.secrets import Boto3SecretsPort
from connector_credentials.adapters.aws.sessions import RENEW_BEFORE, RoleSessions
from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import AssumedRole, InvalidSpecError, parse_spec
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.allowlist import RoleAllowlist
from connector_credentials.core.failures import AwsFailure
from tests.support.podidentity import pod_identity_token

ROLE = "arn:aws:iam::123456789012:role/xpander-controller"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"
FULL_URI = "http://169.254.170.23/v1/credentials"


def token_file(tmp_path: Path) -> str:
    path = tmp_path / "eks-pod-identity-token"
    path.write_text(pod_identity_token("team-a", "controller"))
    return str(path)


def test_which_identity_is_configured(tmp_path: Path) -> None:
    pod = {identity.FULL_URI_ENV: FULL_URI, identity.AUTH_TOKEN_FILE_ENV: token_file(tmp_path)}
    irsa = {identity.ROLE_ENV: ROLE, identity.TOKEN_ENV: "/t"}
    assert identity.configured({}) is None
    assert identity.configured(pod) == identity.POD_IDENTITY
    assert identity.configured(irsa) == identity.IRSA
    assert identity.configured({**pod, **irsa}) == identity.IRSA  # boto3's order
    assert identity.configured({identity.ROLE_ENV: ROLE}) == identity.IRSA  # half IRSA: its problem is reported
    assert identity.configured({identity.ROLE_ENV: ROLE, **pod}) == identity.POD_IDENTITY


def test_credential_source_names() -> None:
    assert identity.source_name("assume-role-with-web-identity") == "IRSA"
    assert identity.source_name("container-role") == "PodIdentity"
    assert identity.source_name("env") == "env"


def test_pod_identity_problems_and_the_association_named(tmp_path: Path) -> None:
    good = {identity.FULL_URI_ENV: FULL_URI, identity.AUTH_TOKEN_FILE_ENV: token_file(tmp_path)}
    assert identity.pod_identity_problem(good) is None
    assert "is not" in (identity.pod_identity_problem({identity.FULL_URI_ENV: FULL_URI}) or "")
    missing = {**good, identity.AUTH_TOKEN_FILE_ENV: str(tmp_path / "gone")}
    assert "cannot be read" in (identity.pod_identity_problem(missing) or "")
    assert identity.service_account(good) == ("team-a", "controller")
    checks = identity.pod_identity_checks(good)
    assert "namespace team-a and service account controller" in checks
    assert "<namespace>" in identity.pod_identity_checks(missing)


@pytest.mark.parametrize(
    ("said", "transient", "phrase"),
    [
        ("Received non 200 response 403 from container metadata: denied", False, "answered with an error"),
        ("Received error when attempting to retrieve container metadata: refused", True, "could not be reached"),
    ],
)
def test_agent_failures_are_pod_identity_failed(said: str, transient: bool, phrase: str) -> None:
    exc = botocore.exceptions.CredentialRetrievalError(provider="container-role", error_msg=said)
    failure = identity.from_retrieval_error(exc, {identity.FULL_URI_ENV: FULL_URI})
    assert failure is not None
    assert (failure.reason, failure.transient) == (Reason.POD_IDENTITY_FAILED, transient)
    assert phrase in failure.message and "169.254.170.23" in failure.message
    other = botocore.exceptions.CredentialRetrievalError(provider="assume-role", error_msg=said)
    assert identity.from_retrieval_error(other, {}) is None


def test_port_refuses_without_a_workload_identity_and_names_both() -> None:
    port = Boto3SecretsPort(OperatorSettings(), environ={})
    with pytest.raises(Exception) as caught:
        port.caller_identity("us-east-1")
    failure: Any = caught.value
    assert failure.reason == Reason.IRSA_NOT_CONFIGURED
    assert "eks.amazonaws.com/role-arn" in failure.message and "Pod Identity association" in failure.message


def test_port_reports_a_missing_pod_identity_token(tmp_path: Path) -> None:
    env = {identity.FULL_URI_ENV: FULL_URI, identity.AUTH_TOKEN_FILE_ENV: str(tmp_path / "gone")}
    port = Boto3SecretsPort(OperatorSettings(), environ=env)
    with pytest.raises(Exception) as caught:
        port.get_secret(parse_spec({"secretArn": SECRET}).arn, version_id=None, version_stage="AWSCURRENT")
    assert getattr(caught.value, "reason", None) == Reason.POD_IDENTITY_FAILED


def test_allowlist_patterns() -> None:
    allow = RoleAllowlist(["arn:aws:iam::111122223333:role/connector-*", "arn:aws:iam::*:role/exact"])
    assert allow.allows("arn:aws:iam::111122223333:role/connector-reader")
    assert allow.allows("arn:aws:iam::444455556666:role/exact")
    assert not allow.allows("arn:aws:iam::111122223333:role/admin")
    assert not allow.allows("arn:aws:iam::444455556666:role/exact-not")
    assert not allow.allows("arn:aws:iam::111122223333:role/connector?reader".replace("?", ""))
    refusal = RoleAllowlist([]).refusal("arn:aws:iam::111122223333:role/x")
    assert refusal is not None and refusal.reason == Reason.ROLE_NOT_ALLOWED and not refusal.transient
    assert "CCRED_ASSUMABLE_ROLES is empty" in refusal.message
    assert allow.refusal("arn:aws:iam::111122223333:role/connector-x") is None


def test_settings_read_the_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_ASSUMABLE_ROLES", "arn:aws:iam::1:role/a*, arn:aws:iam::2:role/b")
    assert OperatorSettings().assumable_roles == ["arn:aws:iam::1:role/a*", "arn:aws:iam::2:role/b"]
    monkeypatch.delenv("CCRED_ASSUMABLE_ROLES")
    assert OperatorSettings().assumable_roles == []


def test_spec_role_fields() -> None:
    spec = parse_spec({"secretArn": SECRET, "roleArn": ROLE, "externalId": "tenant-1"})
    assert spec.role == AssumedRole(ROLE, "tenant-1")
    assert "tenant-1" not in repr(spec.role)
    assert parse_spec({"secretArn": SECRET}).role is None
    with pytest.raises(InvalidSpecError, match="externalId is only used with roleArn"):
        parse_spec({"secretArn": SECRET, "externalId": "tenant-1"})
    with pytest.raises(InvalidSpecError, match="roleArn"):
        parse_spec({"secretArn": SECRET, "roleArn": "xpander-controller"})


class FakeSts:
    def __init__(self, error: Exception | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.error = error
        self.lifetime = 3600.0

    def assume_role(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        expiry = datetime.datetime.fromtimestamp(NOW[0] + self.lifetime, datetime.UTC)
        return {
            "Credentials": {"AccessKeyId": "A", "SecretAccessKey": "S", "SessionToken": "T", "Expiration": expiry},
            "AssumedRoleUser": {"Arn": "arn:aws:sts::111122223333:assumed-role/reader/connector-credential-operator"},
        }


NOW = [1_000_000.0]


def test_sessions_are_cached_per_role_until_shortly_before_expiry() -> None:
    sts = FakeSts()
    sessions = RoleSessions(lambda region: sts, None, clock=lambda: NOW[0])
    reader = AssumedRole("arn:aws:iam::111122223333:role/reader", "tenant-1")
    other = AssumedRole("arn:aws:iam::111122223333:role/reader", "tenant-2")
    assert sessions.identity(reader, "us-east-1", base_identity=ROLE).endswith(
        "assumed-role/reader/connector-credential-operator"
    )
    sessions.identity(reader, "us-east-1", base_identity=ROLE)
    assert len(sts.requests) == 1 and sts.requests[0]["ExternalId"] == "tenant-1"
    sessions.identity(other, "us-east-1", base_identity=ROLE)  # another external id: its own session
    assert len(sts.requests) == 2
    NOW[0] += 3600 - RENEW_BEFORE - 1
    sessions.identity(reader, "us-east-1", base_identity=ROLE)
    assert len(sts.requests) == 2
    NOW[0] += 2  # within RENEW_BEFORE of expiry: renewed
    sessions.identity(reader, "us-east-1", base_identity=ROLE)
    assert len(sts.requests) == 3


def test_an_sts_refusal_names_the_role() -> None:
    denied = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "not authorized to perform: sts:AssumeRole"}}, "AssumeRole"
    )
    sessions = RoleSessions(lambda region: FakeSts(denied), None, clock=lambda: NOW[0])
    role = AssumedRole("arn:aws:iam::111122223333:role/reader")
    with pytest.raises(Exception) as caught:
        sessions.identity(role, "us-east-1", base_identity=ROLE)
    failure: Any = caught.value
    assert failure.reason == Reason.ASSUME_ROLE_FAILED and not failure.transient
    assert role.arn in failure.message and ROLE in failure.message and "sts:ExternalId" in failure.message
    for code in ("Throttling", "ExpiredToken"):
        error = botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"}}, "AssumeRole")
        sessions = RoleSessions(lambda region, error=error: FakeSts(error), None, clock=lambda: NOW[0])
        with pytest.raises(Exception) as caught:
            sessions.identity(role, "us-east-1", base_identity=ROLE)
        assert getattr(caught.value, "transient", False), code


def test_the_operators_own_credentials_failing_inside_assume_role_are_not_the_chained_roles() -> None:
    # The SDK fetches the operator's own credentials lazily, inside the AssumeRole call.
    web_identity = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Not authorized to perform sts:AssumeRoleWithWebIdentity"}},
        "AssumeRoleWithWebIdentity",
    )
    agent = botocore.exceptions.CredentialRetrievalError(
        provider="container-role", error_msg="Received non 200 response 403 from container metadata: denied"
    )
    role = AssumedRole("arn:aws:iam::111122223333:role/reader")
    seen: list[tuple[BaseException, str]] = []

    def own_failure(exc: BaseException, region: str) -> AwsFailure:
        seen.append((exc, region))
        return AwsFailure(Reason.IRSA_NOT_CONFIGURED, "the operator's own identity")

    for error in (web_identity, agent):
        sessions = RoleSessions(
            lambda region, error=error: FakeSts(error), None, clock=lambda: NOW[0], own_failure=own_failure
        )
        with pytest.raises(AwsFailure) as caught:
            sessions.identity(role, "eu-west-1", base_identity=ROLE)
        assert caught.value.reason == Reason.IRSA_NOT_CONFIGURED
        assert role.arn not in caught.value.message
    assert seen == [(web_identity, "eu-west-1"), (agent, "eu-west-1")]
    # Without a callback: the operator's own web-identity refusal, in its words, not the chained role's.
    sessions = RoleSessions(lambda region: FakeSts(web_identity), None, clock=lambda: NOW[0])
    with pytest.raises(AwsFailure) as caught:
        sessions.identity(role, "eu-west-1", base_identity=ROLE)
    assert "refused AssumeRoleWithWebIdentity" in caught.value.message and role.arn not in caught.value.message


def test_a_pod_identity_token_with_a_line_break_is_pod_identity_failed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(Path(token_file(tmp_path)).read_text() + "\n")
    env = {identity.FULL_URI_ENV: FULL_URI, identity.AUTH_TOKEN_FILE_ENV: str(path)}
    assert "line break" in (identity.pod_identity_problem(env) or "")
    port = Boto3SecretsPort(OperatorSettings(), environ=env)
    with pytest.raises(AwsFailure) as caught:
        port.caller_identity("us-east-1")
    assert caught.value.reason == Reason.POD_IDENTITY_FAILED and "line break" in caught.value.message
    # The SDK's own refusal (the file rewritten after the check) reads the same way.
    refused = identity.token_problem_of(ValueError("Auth token value is not a legal header value"), env)
    assert refused is not None and refused.reason == Reason.POD_IDENTITY_FAILED


def test_the_no_proxy_hint_names_the_agent_as_injected() -> None:
    ipv6 = {identity.FULL_URI_ENV: "http://[fd00:ec2::23]/v1/credentials"}
    assert "NO_PROXY includes fd00:ec2::23" in identity.pod_identity_checks(ipv6)
    assert "NO_PROXY includes 169.254.170.23" in identity.pod_identity_checks({})
