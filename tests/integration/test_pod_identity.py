"""EKS Pod Identity beside IRSA: the operator's console script with the environment EKS injects for a
Pod Identity association, against a local stand-in for the eks-pod-identity-agent (on 127.0.0.1)
that checks the Authorization token and hands out credentials from moto's STS."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.conftest import ROLE_ARN, World
from tests.support.awsemu import free_port
from tests.support.podidentity import PodIdentityAgent, pod_identity_env
from tests.support.roles import ALLOW, READER, other_account_secret

#: What every PodIdentityFailed message must point at (the association is xpander/xpander-controller: the token's sub).
CHECKS = (
    "Pod Identity association exists for namespace xpander and service account xpander-controller",
    "eks-pod-identity-agent",
    "NO_PROXY includes 127.0.0.1",  # the agent's host as the URI names it (169.254.170.23 on EKS)
)


@pytest.fixture
def agent(world: World) -> Iterator[PodIdentityAgent]:
    env = pod_identity_env(world.workdir, world.proxy.endpoint, "http://127.0.0.1:1/unused")
    with PodIdentityAgent(world.aws.endpoint, env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]) as running:
        yield running


def env_for(world: World, agent_uri: str) -> dict[str, str]:
    return pod_identity_env(world.workdir, world.proxy.endpoint, agent_uri)


def test_pod_identity_is_accepted_without_any_setting(world: World, agent: PodIdentityAgent) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    web_identity_before = world.proxy.calls("AssumeRoleWithWebIdentity")  # the proxy's counters are per session
    world.start_operator(aws_env=env_for(world, agent.uri))
    ready = world.wait_reason("slack", "AccessVerified")
    assert ready["status"] == "True"
    assert "assumed-role/xpander-controller" in ready["message"]
    status = world.status("slack")
    assert status["credentialSource"] == "PodIdentity"
    assert status["identityArn"].startswith("arn:aws:sts::123456789012:assumed-role/xpander-controller/")
    assert agent.requests >= 1 and agent.refused == 0
    # The secret came through the AWS endpoint with the agent's credentials: no web identity was involved.
    assert world.proxy.calls("AssumeRoleWithWebIdentity") == web_identity_before


def test_irsa_reports_its_credential_source(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator()
    world.wait_reason("slack", "AccessVerified")
    assert world.status("slack")["credentialSource"] == "IRSA"


def test_agent_down_is_pod_identity_failed(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator(aws_env=env_for(world, f"http://127.0.0.1:{free_port()}/v1/credentials"))
    condition = world.wait_reason("slack", "PodIdentityFailed", timeout=40)
    assert condition["status"] == "False"
    assert "could not be reached" in condition["message"]
    for phrase in CHECKS:
        assert phrase in condition["message"]
    assert world.proxy.reads(f"{world.prefix}/slack") == 0  # never fell back to another source


def test_agent_refusal_is_pod_identity_failed(world: World, agent: PodIdentityAgent) -> None:
    agent.refuse()
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator(aws_env=env_for(world, agent.uri))
    condition = world.wait_reason("slack", "PodIdentityFailed", timeout=40)
    assert "answered with an error" in condition["message"] and "403" in condition["message"]
    assert "no association found" in condition["message"]
    for phrase in CHECKS:
        assert phrase in condition["message"]
    assert agent.refused >= 1


def test_missing_token_file_is_pod_identity_failed(world: World, agent: PodIdentityAgent) -> None:
    env = env_for(world, agent.uri)
    os.unlink(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "PodIdentityFailed")
    assert "token file" in condition["message"] and "cannot be read" in condition["message"]
    assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] in condition["message"]
    assert "eks-pod-identity-agent" in condition["message"]
    assert agent.requests == 0  # nothing was sent without the token


def test_neither_identity_names_both_fixes(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    env = {k: v for k, v in world.irsa_env().items() if k not in ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")}
    world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "IRSANotConfigured")
    for phrase in ("eks.amazonaws.com/role-arn", "Pod Identity association", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        assert phrase in condition["message"]
    assert ROLE_ARN not in condition["message"]


def test_static_keys_beside_pod_identity_are_refused_unless_allowed(world: World, agent: PodIdentityAgent) -> None:
    # Static keys come before the container provider in boto3's chain: they would win silently.
    env = {**env_for(world, agent.uri), "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-key"}
    world.apply("slack", {"secretArn": world.secret("slack")})
    first = world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "IRSANotConfigured")
    assert "picked credentials from 'env'" in condition["message"]
    assert "EKS Pod Identity" in condition["message"] and "AWS_CONTAINER_CREDENTIALS_FULL_URI" in condition["message"]
    assert world.proxy.reads(f"{world.prefix}/slack") == 0
    first.stop()
    world.start_operator(aws_env=env, extra_env={"CCRED_ALLOW_NON_IRSA_CREDENTIALS": "true"})
    world.wait_reason("slack", "AccessVerified")
    assert world.status("slack")["credentialSource"] == "env"  # the boto3 method that was let through


def test_a_token_with_a_line_break_is_pod_identity_failed(world: World, agent: PodIdentityAgent) -> None:
    env = env_for(world, agent.uri)
    token_file = env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]
    with open(token_file, "a", encoding="utf-8") as handle:
        handle.write("\n")  # the SDK would refuse to send it as a header (a ValueError, not a reason)
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator(aws_env=env)
    condition = world.wait_reason("slack", "PodIdentityFailed")
    assert "contains a line break" in condition["message"] and token_file in condition["message"]
    assert agent.requests == 0


def test_the_agent_failing_as_a_role_is_assumed_is_pod_identity_failed(world: World, agent: PodIdentityAgent) -> None:
    # Short-lived agent credentials: the SDK fetches them anew inside the AssumeRole call itself.
    agent.lifetime = 60
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.start_operator(aws_env=env_for(world, agent.uri), extra_env=ALLOW)
    world.wait_reason("slack", "AccessVerified")
    agent.refuse()
    world.apply("github", {"secretArn": other_account_secret(world, "github"), "roleArn": READER})
    condition = world.wait_reason("github", "PodIdentityFailed", timeout=40)
    # The operator's own identity failed, not the chained role's trust: no AssumeRoleFailed naming it.
    assert "answered with an error" in condition["message"] and READER not in condition["message"]
    for phrase in CHECKS:
        assert phrase in condition["message"]
