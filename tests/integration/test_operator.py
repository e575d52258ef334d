"""The operator end to end: console script, kubeconfig, IRSA chain, a real API server and moto over real HTTP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest

from tests.integration.conftest import ROLE_ARN, World
from tests.support.runner import wait_until


def test_readable_secret_is_verified_with_status_and_event(world: World) -> None:
    arn = world.secret("slack")
    world.apply("slack", {"secretArn": arn})
    world.start_operator()
    ready = world.wait_reason("slack", "AccessVerified")
    status = world.status("slack")
    obj = world.get("slack")
    assert obj is not None
    assert ready["status"] == "True"
    assert arn in ready["message"]
    assert "assumed-role/xpander-controller" in ready["message"]
    assert ready["observedGeneration"] == obj["metadata"]["generation"] == status["observedGeneration"]
    assert status["versionId"] == world.aws.describe(arn)["VersionIdsToStages"].popitem()[0]
    assert status["identityArn"].startswith("arn:aws:sts::123456789012:assumed-role/xpander-controller/")
    assert status["lastCheckedTime"].endswith("Z")
    [event] = wait_until(lambda: world.events("slack"), timeout=10, message="no event for slack")
    assert (event["type"], event["reason"]) == ("Normal", "AccessVerified")
    assert event["involvedObject"]["uid"] == obj["metadata"]["uid"]
    # kopf stores nothing on our objects, and nothing under its default prefix.
    assert "kopf.zalando.org" not in json.dumps(obj)


def test_every_permanent_reason_is_produced_for_real(world: World) -> None:
    proxy = world.proxy
    plain = world.secret("plain")
    doomed = world.secret("doomed")
    world.aws.schedule_deletion(doomed)
    denied = world.secret("denied")
    kms_denied = world.secret("kms-denied")
    undecryptable = world.secret("undecryptable")
    proxy.deny(secret_id_contains=f"{world.prefix}/denied")
    proxy.deny_kms(secret_id_contains=f"{world.prefix}/kms-denied")
    proxy.decryption_failure(secret_id_contains=f"{world.prefix}/undecryptable")
    json_secret = world.secret("json", string=json.dumps({"api_token": world.canary("token")}))
    missing = plain.replace("/plain-", "/Plain-")  # names are case-sensitive

    world.apply("missing", {"secretArn": missing})
    world.apply("doomed", {"secretArn": doomed})
    world.apply("denied", {"secretArn": denied})
    world.apply("kms-denied", {"secretArn": kms_denied})
    world.apply("undecryptable", {"secretArn": undecryptable})
    world.apply("not-json", {"secretArn": plain, "jsonKey": "api_token"})
    world.apply("no-key", {"secretArn": json_secret, "jsonKey": "password"})
    # Passes the CRD's pattern (any ARN), so only the operator can say what is wrong with it. A too
    # short refreshInterval or versionStage with versionId never get this far: the API server
    # refuses them at apply time (test_crd.py).
    world.apply("wrong-service", {"secretArn": "arn:aws:ssm:us-east-1:123456789012:parameter/x"})
    world.start_operator()

    expectations = {
        "missing": ("SecretNotFound", ["region us-east-1", "case-sensitive", "Plain-"]),
        "doomed": ("SecretScheduledForDeletion", ["restore-secret", doomed]),
        "denied": ("AccessDenied", [ROLE_ARN, denied, "secretsmanager:GetSecretValue"]),
        "kms-denied": ("AccessDenied", [ROLE_ARN, "kms:Decrypt"]),
        "undecryptable": ("DecryptionFailed", ["KMS", undecryptable]),
        "not-json": ("JsonKeyNotFound", ["not JSON"]),
        "no-key": ("JsonKeyNotFound", ["no top-level key 'password'"]),
        "wrong-service": ("InvalidSpec", ["'ssm' resource"]),
    }
    for name, (reason, phrases) in expectations.items():
        condition = world.wait_reason(name, reason)
        assert condition["status"] == "False", name
        for phrase in phrases:
            assert phrase in condition["message"], (name, phrase, condition["message"])
        # The Event follows the status write: wait for it rather than race it.
        warnings = wait_until(
            lambda name=name: [e for e in world.events(name) if e["type"] == "Warning"],
            timeout=10,
            message=f"no Warning event for {name}",
        )
        assert [e["reason"] for e in warnings] == [reason], name
    # Permanent answers are not retried in a loop: one read per credential (default interval 5m).
    assert proxy.reads(f"{world.prefix}/denied") == 1
    assert proxy.reads(f"{world.prefix}/doomed") == 1


@pytest.mark.parametrize(
    ("fault", "phrases"),
    [
        ("deny_assume_role", ["sts:AssumeRoleWithWebIdentity", "trust policy"]),
        ("invalid_identity_token", ["InvalidIdentityToken", "OIDC provider"]),
        ("expired_token", ["ExpiredTokenException"]),
    ],
)
def test_sts_refusal_is_assume_role_failed(world: World, fault: str, phrases: list[str]) -> None:
    getattr(world.proxy, fault)()
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator()
    condition = world.wait_reason("slack", "AssumeRoleFailed")
    assert ROLE_ARN in condition["message"]
    for phrase in phrases:
        assert phrase in condition["message"]


def test_missing_irsa_is_refused_without_falling_back(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    env = {k: v for k, v in world.irsa_env().items() if not k.startswith("AWS_ROLE_ARN")}
    env.pop("AWS_WEB_IDENTITY_TOKEN_FILE")
    world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "IRSANotConfigured")
    for phrase in (
        "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE are not set",
        "eks.amazonaws.com/role-arn",
        "restarted",
    ):
        assert phrase in condition["message"]
    assert world.proxy.calls(secret_id_contains=f"{world.prefix}/") == 0


def test_unreadable_token_file_is_irsa_not_configured(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    env = world.irsa_env()
    env["AWS_WEB_IDENTITY_TOKEN_FILE"] = str(world.workdir / "no-such-token")
    world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "IRSANotConfigured")
    assert "no-such-token cannot be read" in condition["message"]


def test_static_keys_are_refused_unless_allowed(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    env = {**world.irsa_env(), "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-key"}
    first = world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "IRSANotConfigured")
    assert "picked credentials from 'env'" in condition["message"]
    first.stop()
    world.start_operator(aws_env=env, extra_env={"CCRED_ALLOW_NON_IRSA_CREDENTIALS": "true"})
    world.wait_reason("slack", "AccessVerified")


def test_transient_failures_with_nothing_verified_are_reported(world: World) -> None:
    world.proxy.throttle(secret_id_contains=f"{world.prefix}/throttled")
    world.proxy.fail_5xx(secret_id_contains=f"{world.prefix}/broken")
    world.apply("throttled", {"secretArn": world.secret("throttled")})
    world.apply("broken", {"secretArn": world.secret("broken")})
    world.start_operator()
    assert "Rate exceeded" in world.wait_reason("throttled", "Throttled")["message"]
    assert world.wait_reason("broken", "AWSUnavailable")["status"] == "False"
    # Recovery without a restart: the backoff retries and lands on AccessVerified.
    world.proxy.clear()
    world.wait_reason("throttled", "AccessVerified", timeout=20)
    world.wait_reason("broken", "AccessVerified", timeout=20)


def test_spec_update_is_rechecked(world: World) -> None:
    token = world.canary("token")
    arn = world.secret("jira", string=json.dumps({"api_token": token, "user": "bot"}))
    world.apply("jira", {"secretArn": arn, "jsonKey": "nope"})
    world.start_operator()
    world.wait_reason("jira", "JsonKeyNotFound")
    world.update_spec("jira", {"secretArn": arn, "jsonKey": "api_token"})
    condition = world.wait_reason("jira", "AccessVerified")
    assert condition["observedGeneration"] == world.get("jira")["metadata"]["generation"]  # type: ignore[index]
    with world.client() as client:
        assert client.get(world.namespace, "jira").value == token


def test_rotation_is_noticed_within_refresh_interval(world: World) -> None:
    arn = world.secret("rotating")
    world.apply("rotating", {"secretArn": arn, "refreshInterval": "5s"})
    world.start_operator()
    world.wait_reason("rotating", "AccessVerified")
    before = world.status("rotating")["versionId"]
    transition = world.ready("rotating")["lastTransitionTime"]  # type: ignore[index]
    new_value = world.canary("rotated")
    new_version = world.aws.put_value(arn, string=new_value)
    wait_until(lambda: world.status("rotating").get("versionId") == new_version, timeout=12, message="rotation")
    assert new_version != before
    assert world.ready("rotating")["lastTransitionTime"] == transition  # type: ignore[index]
    # The Event follows the status write: wait for it rather than race it.
    rotated = wait_until(
        lambda: [e for e in world.events("rotating") if e["reason"] == "Rotated"],
        timeout=10,
        message="no Rotated Event",
    )
    assert len(rotated) == 1
    assert new_version in rotated[0]["message"]
    with world.client() as client:
        assert client.get(world.namespace, "rotating").value == new_value


def test_restart_resumes_without_new_transitions(world: World) -> None:
    arn = world.secret("slack")
    world.apply("slack", {"secretArn": arn})
    first = world.start_operator()
    before = world.wait_reason("slack", "AccessVerified")
    # The transition's Event follows its status write (its own sender): stopped before it is
    # posted, it would never be (the next process finds the status saying it already).
    wait_until(
        lambda: [e["reason"] for e in world.events("slack")] == ["AccessVerified"],
        timeout=10,
        message="the first process never posted its Event",
    )
    first.stop()
    second = world.start_operator()
    second.wait_for_log("slack: AccessVerified", timeout=20)
    with world.client() as client:
        assert client.get(world.namespace, "slack").arn == arn
    after = world.ready("slack")
    assert after is not None
    assert after["lastTransitionTime"] == before["lastTransitionTime"]
    assert [e["reason"] for e in world.events("slack")] == ["AccessVerified"]


def test_an_event_still_queued_at_sigterm_is_posted_before_the_exit(world: World) -> None:
    # The Event follows its status write on a sender of its own; the API refuses Events until the
    # signal is sent, so that it can only be posted after SIGTERM, during the shutdown.
    refused = world.kube.fail_requests(
        "POST", rf"^/api/v1/namespaces/{world.namespace}/events$", status=500, times=None
    )
    world.apply("slack", {"secretArn": world.secret("slack")})
    operator = world.start_operator(extra_env={"CCRED_SHUTDOWN_DRAIN": "1"})
    world.wait_reason("slack", "AccessVerified")
    wait_until(lambda: refused.hits > 0, timeout=10, message="the Event was never tried")
    operator.send_signal(signal.SIGTERM)
    world.kube.remove_fault(refused)
    assert operator.wait(20) == 0
    assert [e["reason"] for e in world.events("slack")] == ["AccessVerified"]


def test_deleted_credential_is_forgotten(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator()
    world.wait_reason("slack", "AccessVerified")
    world.delete("slack")
    with world.client() as client:
        wait_until(lambda: not client.list(), timeout=10, message="credential still listed after deletion")


def test_kubectl_describe_shows_the_reason_and_events(world: World) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed on this machine")
    world.apply("missing", {"secretArn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:nope-AbCdEf"})
    world.start_operator()
    world.wait_reason("missing", "SecretNotFound")
    kubeconfig = str(world.cluster.admin_kubeconfig)  # a person with read access, not the operator
    described = subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "describe", "ccred", "missing", "-n", world.namespace],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "SecretNotFound" in described
    assert "region eu-west-1" in described
    assert "Warning" in described
    listed = subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "get", "ccred", "-n", world.namespace],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    header = listed.splitlines()[0].split()
    assert header[:4] == ["NAME", "READY", "REASON", "AGE"]
    assert "SecretNotFound" in listed
