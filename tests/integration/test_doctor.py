"""``connector-credentials doctor`` as a user runs it: the console script in a subprocess, with the
operator's own environment (``OperatorProcess``'s), against the real API server and moto behind the
fault proxies. Every check is made to fail for real; no run may print a secret value or a token."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import World
from tests.support.podidentity import PodIdentityAgent, pod_identity_env
from tests.support.roles import ALLOW, READER, other_account_secret
from tests.support.runner import OperatorProcess, console_script
from tests.support.tokens import service_account_token

#: The fixed checks, in the order the contract gives them; then one line per credential.
ORDER = ["identity", "token", "role-arn", "regions", "sts", "kubernetes"]


@dataclass
class Report:
    code: int
    stdout: str
    stderr: str

    def line(self, label: str) -> str:
        """The line of a check (``sts``) or of a credential (``credential NS/NAME``)."""
        found = [line for line in self.stdout.splitlines() if line[6:].split("  ")[0].strip() == label]
        assert len(found) == 1, f"no single line for {label!r} in:\n{self.stdout}\n{self.stderr}"
        return found[0]

    def result(self, label: str) -> str:
        return self.line(label)[:4]

    def labels(self) -> list[str]:
        return [line[6:].split("  ")[0].strip() for line in self.stdout.splitlines()[:-1]]


def doctor(
    world: World,
    *args: str,
    aws_env: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    kubeconfig: Path | None = None,
    namespace: bool = True,
) -> Report:
    """Run the console script with the environment the operator gets (``OperatorProcess`` builds it)."""
    aws_env = world.irsa_env() if aws_env is None else aws_env
    env = OperatorProcess(
        namespace=world.namespace,
        kubeconfig=kubeconfig or world.operator_kubeconfig(direct=True),
        aws_env=aws_env,
        socket_path=world.socket_path,
        extra_env=extra_env,
        home=world.workdir / "home-doctor",
    ).env
    command = [console_script(), "doctor", *(("-n", world.namespace) if namespace else ()), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert_nothing_secret(world, done.stdout + done.stderr, env)
    return Report(done.returncode, done.stdout, done.stderr)


def assert_nothing_secret(world: World, output: str, env: dict[str, str]) -> None:
    for canary in world.canaries:
        assert canary not in output, "a secret value was printed"
    tokens = [world.token]
    for variable in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
        path = env.get(variable)
        if path and os.path.exists(path):
            tokens.append(Path(path).read_text(encoding="utf-8", errors="replace").strip())
    for token in tokens:
        for part in (token, *token.split(".")):
            if len(part) >= 16:
                assert part not in output, "a token (or a part of it) was printed"


def test_all_pass_exits_0_with_every_check_in_order(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.apply(
        "jira",
        {"secretArn": world.secret("jira", string='{"token": "' + world.canary("jira") + '"}'), "jsonKey": "token"},
    )
    report = doctor(world)
    assert report.code == 0, report.stdout + report.stderr
    assert report.labels() == [*ORDER, f"credential {world.namespace}/jira", f"credential {world.namespace}/slack"]
    assert {line[:4] for line in report.stdout.splitlines()[:-1]} == {"PASS"}
    token = report.line("token")
    for claim in (
        "aud sts.amazonaws.com",
        "sub system:serviceaccount:xpander:xpander-controller",
        "iss https://oidc.eks",
    ):
        assert claim in token
    assert "expires " in token and "(in 23h" in token
    assert "us-east-1" in report.line("regions")
    assert "assumed-role/xpander-controller (credentials from IRSA)" in report.line("sts")
    assert "AccessVerified: Read arn:aws:secretsmanager:us-east-1" in report.line(f"credential {world.namespace}/slack")
    assert report.stdout.splitlines()[-1] == "PASS: 0 failed, 8 passed, 0 skipped"
    assert report.stderr == ""  # no library logs


def token_missing(path: Path) -> str:
    path.unlink()
    return "cannot be read (No such file or directory)"


def token_not_a_jwt(path: Path) -> str:
    path.write_text("this-is-not-a-jwt-but-must-not-be-printed-either", encoding="utf-8")
    return "it is not a JWT"


def token_expired(path: Path) -> str:
    path.write_text(service_account_token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), encoding="utf-8")
    return "it has expired"


def token_wrong_audience(path: Path) -> str:
    path.write_text(service_account_token("https://kubernetes.default.svc"), encoding="utf-8")
    return "aud is not sts.amazonaws.com"


@pytest.mark.parametrize("spoil", [token_missing, token_not_a_jwt, token_expired, token_wrong_audience])
def test_a_bad_token_file_fails_and_skips_aws(world: World, spoil: Any) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    env = world.irsa_env()
    reads = world.proxy.reads(f"{world.prefix}/slack")
    problem = spoil(Path(env["AWS_WEB_IDENTITY_TOKEN_FILE"]))
    report = doctor(world, aws_env=env)
    assert report.code == 1
    assert report.result("identity") == "PASS"
    assert report.result("token") == "FAIL" and problem in report.line("token")
    assert "Fix: " in report.line("token")
    assert report.result("sts") == "SKIP" and "token failed" in report.line("sts")
    assert report.result(f"credential {world.namespace}/slack") == "SKIP"
    assert report.result("kubernetes") == "PASS"  # independent of AWS
    assert world.proxy.reads(f"{world.prefix}/slack") == reads


def test_a_role_name_instead_of_an_arn_fails_role_arn(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    report = doctor(world, aws_env={**world.irsa_env(), "AWS_ROLE_ARN": "xpander-controller"})
    assert report.code == 1
    line = report.line("role-arn")
    assert line.startswith("FAIL") and "'xpander-controller' is not an IAM role ARN" in line
    assert "eks.amazonaws.com/role-arn" in line
    assert report.result("sts") == "SKIP" and "role-arn failed" in report.line("sts")


def test_no_workload_identity_fails_identity_and_skips_the_rest_of_aws(world: World) -> None:
    env = {k: v for k, v in world.irsa_env().items() if k not in ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")}
    world.apply("slack", {"secretArn": world.secret("slack")})
    report = doctor(world, aws_env=env)
    assert report.code == 1
    assert report.result("identity") == "FAIL" and "Pod Identity association" in report.line("identity")
    assert [report.result(label) for label in ("token", "role-arn", "sts")] == ["SKIP"] * 3


@pytest.mark.parametrize("refuse", ["GetCallerIdentity", "AssumeRoleWithWebIdentity"])
def test_sts_refusal_fails_sts_and_skips_the_reads(world: World, refuse: str) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    if refuse == "GetCallerIdentity":
        world.proxy.deny(action="GetCallerIdentity")
    else:
        world.proxy.deny_assume_role()
    report = doctor(world)
    assert report.code == 1
    line = report.line("sts")
    assert line.startswith("FAIL  sts") and "AssumeRoleFailed" in line, line
    assert "troubleshooting.md#assumerolefailed" in line
    assert report.result(f"credential {world.namespace}/slack") == "SKIP"
    assert world.proxy.reads(f"{world.prefix}/slack") == 0


def test_a_denied_secret_fails_with_the_operators_own_message(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.apply("denied", {"secretArn": world.secret("denied")})
    world.proxy.deny(f"{world.prefix}/denied")
    report = doctor(world)
    assert report.code == 1
    assert report.result(f"credential {world.namespace}/slack") == "PASS"
    denied = report.line(f"credential {world.namespace}/denied")
    assert denied.startswith("FAIL") and "AccessDenied: Secrets Manager denied secretsmanager:GetSecretValue" in denied
    # What the operator writes to the status, word for word.
    world.start_operator()
    for name in ("slack", "denied"):
        condition = world.wait_reason(name, "AccessDenied" if name == "denied" else "AccessVerified")
        assert f"{condition['reason']}: {condition['message']}" in report.line(f"credential {world.namespace}/{name}")


def test_json_output_parses_and_matches_the_text(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.apply("denied", {"secretArn": world.secret("denied")})
    world.proxy.deny(f"{world.prefix}/denied")
    text = doctor(world)
    as_json = doctor(world, "-o", "json")
    assert as_json.code == text.code == 1
    document = json.loads(as_json.stdout)
    assert document["result"] == "fail" and document["namespaces"] == [world.namespace]
    checks = document["checks"]
    assert [c["check"] for c in checks] == [*ORDER, "credential", "credential"]
    assert set(checks[0]) == {"check", "result", "detail", "fix"}
    assert [(f"credential {c['credential']}" if "credential" in c else c["check"], c["result"]) for c in checks] == [
        (label, text.result(label)) for label in text.labels()
    ]
    denied = next(c for c in checks if c.get("credential") == f"{world.namespace}/denied")
    assert denied["reason"] == "AccessDenied" and denied["fix"]
    assert all(c["fix"] is None for c in checks if c["result"] != "FAIL")
    assert json.loads(doctor(world, "--output", "json").stdout)["result"] == "fail"


@pytest.fixture
def limited_kubeconfig(world: World) -> Path:
    """A service account of the test's namespace that RBAC grants nothing."""
    world.cluster.apply(
        "v1/serviceaccounts",
        world.namespace,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "no-rights"}},
    )
    token = world.cluster.service_account_token(world.namespace, "no-rights")
    world.canaries.append(token)  # a token too: it must not be printed
    return world.cluster.write_kubeconfig(
        world.workdir / "no-rights.kubeconfig", token=token, namespace=world.namespace
    )


def test_rbac_refusal_names_the_missing_role(world: World, limited_kubeconfig: Path) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    report = doctor(world, kubeconfig=limited_kubeconfig)
    assert report.code == 1
    line = report.line("kubernetes")
    assert line.startswith("FAIL") and "refused to list ConnectorCredentials" in line
    assert 'cannot list resource "connectorcredentials"' in line
    assert "deploy/sidecar/rbac.yaml" in line and "get, list, watch" in line
    assert report.result("regions") == "SKIP"
    assert report.result("sts") == "PASS"  # AWS does not depend on Kubernetes
    assert report.result("credentials") == "SKIP"


def test_all_namespaces_with_the_shipped_role_says_to_pass_a_namespace(world: World) -> None:
    report = doctor(world, "-A", namespace=False)
    assert report.code == 1
    line = report.line("kubernetes")
    assert "in every namespace" in line and "pass -n NAMESPACE" in line


def test_namespaces_come_from_ccred_namespace_as_for_run(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    report = doctor(world, namespace=False, extra_env={"CCRED_NAMESPACE": world.namespace})
    assert report.code == 0, report.stdout
    assert f"in namespace {world.namespace}: 1 to check" in report.line("kubernetes")


@pytest.mark.parametrize(
    "args", [("-A",), ("-o", "yaml"), ("--no-such-option",)], ids=["both-namespace-options", "bad-output", "unknown"]
)
def test_usage_errors_exit_2(world: World, args: tuple[str, ...]) -> None:
    report = doctor(world, *args)
    assert report.code == 2, report.stdout + report.stderr
    assert "Usage:" in report.stderr and report.stdout == ""


def test_named_credentials_and_an_undeclared_name(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    world.apply("jira", {"secretArn": world.secret("jira")})
    report = doctor(world, "slack", "ghost")
    assert report.code == 1
    assert report.labels()[len(ORDER) :] == [f"credential {world.namespace}/slack", "credential ghost"]
    assert report.result(f"credential {world.namespace}/slack") == "PASS"
    assert report.line("credential ghost").startswith(
        f"FAIL  credential ghost  not declared in namespace {world.namespace}"
    )
    assert world.proxy.reads(f"{world.prefix}/jira") == 0
    only = doctor(world, f"{world.namespace}/jira")
    assert only.code == 0 and only.labels()[len(ORDER) :] == [f"credential {world.namespace}/jira"]


def test_role_arn_credentials_go_through_the_allowlist_and_assume_role(world: World) -> None:
    arn = other_account_secret(world, "github")
    world.apply("github", {"secretArn": arn, "roleArn": READER})
    world.apply("admin", {"secretArn": arn, "roleArn": "arn:aws:iam::210987654321:role/admin"})
    report = doctor(world, extra_env=ALLOW)
    assert report.code == 1
    assert "assumed-role/connector-reader" in report.line(f"credential {world.namespace}/github")
    admin = report.line(f"credential {world.namespace}/admin")
    assert admin.startswith("FAIL") and "RoleNotAllowed" in admin and "CCRED_ASSUMABLE_ROLES" in admin


@pytest.fixture
def agent(world: World) -> Iterator[PodIdentityAgent]:
    env = pod_identity_env(world.workdir, world.proxy.endpoint, "http://127.0.0.1:1/unused")
    with PodIdentityAgent(world.aws.endpoint, env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]) as running:
        yield running


def test_pod_identity_passes(world: World, agent: PodIdentityAgent) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    report = doctor(world, aws_env=pod_identity_env(world.workdir, world.proxy.endpoint, agent.uri))
    assert report.code == 0, report.stdout + report.stderr
    assert "EKS Pod Identity" in report.line("identity")
    assert "aud pods.eks.amazonaws.com" in report.line("token") and report.result("token") == "PASS"
    assert report.result("role-arn") == "SKIP" and "association" in report.line("role-arn")
    assert "(credentials from PodIdentity)" in report.line("sts")
    assert report.result(f"credential {world.namespace}/slack") == "PASS"
    assert agent.requests >= 1 and agent.refused == 0
