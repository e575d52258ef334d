"""doctor's pure parts: token claims and expiry, each check's verdict, the order and the SKIP rules
(over a fake probe), and the JSON document's shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from connector_credentials.adapters.kube.apiserver import KubeApiError
from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import ConnectorCredentialSpec
from connector_credentials.cli.checks import (
    FAIL,
    PASS,
    SKIP,
    Declared,
    TokenError,
    regions_check,
    select,
    token_check,
    token_claims,
)
from connector_credentials.cli.doctor import as_document, as_text, diagnose
from connector_credentials.core.allowlist import RoleAllowlist
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import FetchedSecret
from tests.support.tokens import unsigned_jwt

NOW = 1_750_000_000.0
ROLE = "arn:aws:iam::123456789012:role/xpander-controller"
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:slack-AbCdEf"
IRSA_ENV = {"AWS_ROLE_ARN": ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": "/token"}


def jwt(**claims: Any) -> bytes:
    body = {
        "aud": ["sts.amazonaws.com"],
        "sub": "system:serviceaccount:xpander:xpander-controller",
        "iss": "https://oidc.example/id/X",
        "iat": NOW - 3600,
        "exp": NOW + 82800,
        **claims,
    }
    return unsigned_jwt(body).encode()  # at a fixed NOW


class FakeProbe:
    def __init__(self, environ: dict[str, str], *, items: Any = (), token: bytes | None = None) -> None:
        self.environ = environ
        self.items = items
        self.token = jwt() if token is None else token
        self.sts: str | AwsFailure = "arn:aws:sts::123456789012:assumed-role/xpander-controller/session-1"
        self.denied: set[str] = set()
        self.reads: list[str] = []

    @property
    def credential_source(self) -> str | None:
        return "IRSA"

    def read_token(self, path: str) -> bytes:
        return self.token

    def list_credentials(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        if isinstance(self.items, BaseException):
            raise self.items
        return list(self.items)

    def caller_identity(self, region: str) -> str:
        if isinstance(self.sts, AwsFailure):
            raise self.sts
        return self.sts

    def read(self, spec: ConnectorCredentialSpec) -> tuple[str, FetchedSecret]:
        self.reads.append(spec.secret_arn)
        if spec.secret_arn in self.denied:
            raise AwsFailure(Reason.ACCESS_DENIED, f"Secrets Manager denied {spec.secret_arn}.")
        return str(self.sts), FetchedSecret(version_id="v1", raw='{"token": "CANARY-value"}', stages=("AWSCURRENT",))


def item(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}, "spec": {"secretArn": ARN, **spec}}


# --- token claims ---------------------------------------------------------------------------------


def test_claims_are_decoded_without_the_signature() -> None:
    assert token_claims(jwt())["sub"] == "system:serviceaccount:xpander:xpander-controller"


@pytest.mark.parametrize(
    ("token", "problem"),
    [(b"abc", "not a JWT"), (b"a..c", "not a JWT"), (b"a.!!!!.c", "not base64url"), (b"a.WzFd.c", "not a JSON object")],
)
def test_what_is_not_a_jwt_is_named_without_quoting_it(token: bytes, problem: str) -> None:
    with pytest.raises(TokenError, match=problem) as caught:
        token_claims(token)
    assert token.decode() not in str(caught.value)


def test_a_good_token_passes_and_shows_only_its_claims() -> None:
    token = jwt()
    check = token_check("IRSA", "/token", token, NOW)
    assert check.result == PASS
    assert "aud sts.amazonaws.com, sub system:serviceaccount:xpander:xpander-controller" in check.detail
    assert "expires 2025-06-16T14:06:40Z (in 23h00m)" in check.detail
    for part in token.decode().split("."):
        assert part not in check.detail


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"exp": NOW - 60}, "it has expired"),
        ({"exp": NOW + 60, "iat": NOW - 86000}, "about to expire"),  # < 10 % of its lifetime left: not renewed
        ({"exp": None}, "no exp claim"),
        ({"aud": "pods.eks.amazonaws.com"}, "aud is not sts.amazonaws.com"),
        ({"sub": "alice"}, "sub is not system:serviceaccount"),
    ],
)
def test_token_problems_fail(claims: dict[str, Any], problem: str) -> None:
    check = token_check("IRSA", "/token", jwt(**claims), NOW)
    assert check.result == FAIL and problem in check.detail and check.fix


def test_a_fresh_short_lived_token_is_not_late() -> None:
    assert token_check("IRSA", "/token", jwt(iat=NOW - 100, exp=NOW + 500), NOW).result == PASS


def test_pod_identity_expects_its_own_audience() -> None:
    assert token_check("PodIdentity", "/t", jwt(aud=["pods.eks.amazonaws.com"]), NOW).result == PASS
    assert token_check("PodIdentity", "/t", jwt(), NOW).result == FAIL


def test_a_pod_identity_token_with_a_line_break_fails() -> None:
    # It is sent as a header as it is: the SDK refuses a line break (IRSA's token goes in a body).
    token = jwt(aud=["pods.eks.amazonaws.com"])
    check = token_check("PodIdentity", "/t", token + b"\n", NOW)
    assert (check.result, check.detail) == (FAIL, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/t contains a line break")
    assert token_check("IRSA", "/t", jwt() + b"\n", NOW).result == PASS


def test_an_unexpected_error_is_a_fail_line_that_does_not_quote_it() -> None:
    class Broken(FakeProbe):
        def read(self, spec: ConnectorCredentialSpec) -> tuple[str, FetchedSecret]:
            raise ValueError("CANARY-value in an error text")

        def caller_identity(self, region: str) -> str:
            raise RuntimeError("CANARY-value again")

    checks = diagnose(Broken(IRSA_ENV, items=[item("slack")]), namespaces=["ns"], now=NOW)
    assert results(checks)[4:] == [("sts", FAIL), ("kubernetes", PASS), ("ns/slack", SKIP)]
    assert checks[4].detail == "failed unexpectedly (RuntimeError)"
    probe = Broken(IRSA_ENV, items=[item("slack")])
    probe.caller_identity = lambda region: "arn:aws:sts::123456789012:assumed-role/x/y"  # type: ignore[method-assign]
    checks = diagnose(probe, namespaces=["ns"], now=NOW)
    assert results(checks)[-1] == ("ns/slack", FAIL) and checks[-1].detail == "failed unexpectedly (ValueError)"
    assert "CANARY" not in as_text(checks)


def test_an_unreadable_or_empty_file_fails() -> None:
    assert "cannot be read (No such file" in token_check("IRSA", "/t", FileNotFoundError(2, "No such file"), NOW).detail
    assert "is empty" in token_check("IRSA", "/t", b"\n", NOW).detail


# --- regions and selection -----------------------------------------------------------------------------


def test_regions_come_from_the_arns_and_a_missing_one_fails() -> None:
    good = Declared("ns", "a", {"secretArn": ARN})
    bad = Declared("ns", "b", {"secretArn": "arn:aws:secretsmanager:useast1:123456789012:secret:x"})
    assert regions_check([good]).detail.startswith("secrets are read in eu-west-1")
    failed = regions_check([good, bad])
    assert failed.result == FAIL and "ns/b" in failed.detail and "ns/a" not in failed.detail
    assert regions_check(None).result == regions_check([]).result == SKIP


def test_doctor_reads_the_european_sovereign_cloud_region() -> None:
    # #17, defect 8: doctor shares the operator's ARN rules, and failed this ARN as "no valid region".
    arn = "arn:aws-eusc:secretsmanager:eusc-de-east-1:123456789012:secret:name-AbCdEf"
    eusc = Declared("ns", "c", {"secretArn": arn})
    check = regions_check([eusc])
    assert check.result == PASS, check.detail
    assert check.detail.startswith("secrets are read in eusc-de-east-1")


def test_names_select_by_name_or_namespace_and_name() -> None:
    items = [item("b"), item("a"), {"metadata": {"namespace": "ns", "name": "gone", "deletionTimestamp": "x"}}]
    assert [d.name for d in select(items, [])[0]] == ["a", "b"]
    chosen, missing = select(items, ["ns/b", "ghost", "gone"])
    assert [d.ref for d in chosen] == ["ns/b"] and missing == ["ghost", "gone"]


# --- the order and the SKIP rules ----------------------------------------------------------------------


def results(checks: Any) -> list[tuple[str, str]]:
    return [(c.credential or c.check, c.result) for c in checks]


def test_all_pass_in_the_documented_order() -> None:
    probe = FakeProbe(IRSA_ENV, items=[item("slack", jsonKey="token")])
    checks = diagnose(probe, namespaces=["ns"], now=NOW)
    assert results(checks) == [
        ("identity", PASS),
        ("token", PASS),
        ("role-arn", PASS),
        ("regions", PASS),
        ("sts", PASS),
        ("kubernetes", PASS),
        ("ns/slack", PASS),
    ]
    assert checks[-1].reason == "AccessVerified"
    assert "assumed-role/xpander-controller;" in checks[-1].detail  # the status's words: no session name
    assert "CANARY" not in as_text(checks) + json.dumps(as_document(checks, ["ns"]))


def test_no_identity_skips_every_aws_check_but_still_lists() -> None:
    probe = FakeProbe({}, items=[item("slack")])
    assert results(diagnose(probe, namespaces=["ns"], now=NOW)) == [
        ("identity", FAIL),
        ("token", SKIP),
        ("role-arn", SKIP),
        ("regions", PASS),
        ("sts", SKIP),
        ("kubernetes", PASS),
        ("ns/slack", SKIP),
    ]
    assert probe.reads == []


def test_another_credential_source_when_allowed_skips_without_failing() -> None:
    checks = diagnose(FakeProbe({}, items=[item("slack")]), namespaces=["ns"], allow_other=True, now=NOW)
    assert [c.result for c in checks] == [PASS, SKIP, SKIP, PASS, PASS, PASS, PASS]


def test_a_failed_sts_skips_the_reads_but_not_what_needs_no_aws() -> None:
    probe = FakeProbe(IRSA_ENV, items=[item("slack"), item("other", roleArn="arn:aws:iam::210987654321:role/x")])
    probe.sts = AwsFailure(Reason.ASSUME_ROLE_FAILED, "STS refused.")
    checks = diagnose(probe, namespaces=["ns"], now=NOW)
    assert results(checks)[4:] == [("sts", FAIL), ("kubernetes", PASS), ("ns/other", FAIL), ("ns/slack", SKIP)]
    assert checks[6].reason == "RoleNotAllowed"
    assert probe.reads == []


def test_a_refused_listing_skips_regions_and_credentials() -> None:
    denied = KubeApiError(403, "Forbidden", 'cannot list resource "connectorcredentials"')
    checks = diagnose(FakeProbe(IRSA_ENV, items=denied), namespaces=["ns"], now=NOW)
    assert results(checks) == [
        ("identity", PASS),
        ("token", PASS),
        ("role-arn", PASS),
        ("regions", SKIP),
        ("sts", PASS),
        ("kubernetes", FAIL),
        ("credentials", SKIP),
    ]
    assert "deploy/sidecar/rbac.yaml" in str(checks[5].fix)
    everywhere = diagnose(FakeProbe(IRSA_ENV, items=denied), namespaces=None, now=NOW)[5]
    assert "pass -n NAMESPACE" in str(everywhere.fix)


def test_verdicts_per_credential_and_undeclared_names() -> None:
    probe = FakeProbe(IRSA_ENV, items=[item("ok"), item("denied", secretArn=ARN + "x"), item("bad", jsonKey="nope")])
    probe.denied.add(ARN + "x")
    allow = RoleAllowlist(())
    checks = diagnose(probe, namespaces=["ns"], names=["ok", "denied", "bad", "ghost"], roles=allow, now=NOW)
    lines = {c.credential: c for c in checks if c.credential}
    assert (lines["ns/ok"].result, lines["ns/denied"].reason, lines["ns/bad"].reason) == (
        PASS,
        "AccessDenied",
        "JsonKeyNotFound",
    )
    assert lines["ghost"].result == FAIL and lines["ghost"].detail == "not declared in namespace ns"
    assert lines["ns/denied"].fix == "See docs/troubleshooting.md#accessdenied."


def test_nothing_declared_is_a_skip_not_a_failure() -> None:
    checks = diagnose(FakeProbe(IRSA_ENV), namespaces=["ns"], now=NOW)
    assert checks[-1].check == "credentials" and checks[-1].result == SKIP
    assert as_document(checks, ["ns"])["result"] == "pass"


# --- output --------------------------------------------------------------------------------------------


def test_the_json_document_shape() -> None:
    probe = FakeProbe(IRSA_ENV, items=[item("slack")], token=jwt(exp=NOW - 1))
    document = as_document(diagnose(probe, namespaces=["ns"], now=NOW), ["ns"])
    assert set(document) == {"result", "namespaces", "checks"}
    assert document["result"] == "fail" and document["namespaces"] == ["ns"]
    for check in document["checks"]:
        assert {"check", "result", "detail", "fix"} <= set(check)
        assert check["result"] in ("PASS", "FAIL", "SKIP")
        assert (check["fix"] is not None) == (check["result"] == "FAIL")
    credential = document["checks"][-1]
    assert credential == {
        "check": "credential",
        "result": "SKIP",
        "detail": "token failed: not read",
        "fix": None,
        "credential": "ns/slack",
        "reason": None,
    }
    json.dumps(document)  # serialisable as it is


def test_the_text_has_one_line_per_check_and_a_summary() -> None:
    checks = diagnose(FakeProbe(IRSA_ENV, items=[item("slack")]), namespaces=["ns"], now=NOW)
    lines = as_text(checks).splitlines()
    assert len(lines) == len(checks) + 1
    assert lines[0].startswith("PASS  identity     IRSA")
    assert lines[-1] == "PASS: 0 failed, 7 passed, 0 skipped"
