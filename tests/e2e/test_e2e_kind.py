"""End to end on kind: deploy/ + IRSA (as the EKS webhook injects it) + fake AWS.

The fixtures create a kind cluster (or reuse ``E2E_KIND_CLUSTER``), build and load the
images, apply ``tests/e2e/overlay`` (deploy/ plus fake AWS), then apply
``deploy/samples`` with their ARNs replaced by the seeded secrets' real ARNs (moto gives
every secret its own 6-character suffix, as AWS does).

Fake AWS (``fake_aws.py``) enforces deploy/iam/policy.json and trust-policy.json, so
``denied`` really is refused by the policy (AccessDenied) and ``missing`` does not exist
(SecretNotFound).

Knobs: ``E2E_KIND_CLUSTER`` (default ccred-e2e), ``E2E_KEEP_CLUSTER=1``, ``E2E_SKIP_BUILD=1``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import yaml

from tests.e2e import fake_aws
from tests.e2e.e2e_helpers import (
    CLUSTER,
    FAKE_AWS_IMAGE,
    NAMESPACE,
    OPERATOR_IMAGE,
    REPO,
    SOCKET,
    kubectl,
    ready_condition,
    require_tools,
    run,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROLE_ARN = "arn:aws:iam::111122223333:role/xpander-controller"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:xpander-controller"
VALUES = (
    fake_aws.SLACK_VALUE,
    fake_aws.JIRA_TOKEN,
    fake_aws.GITHUB_OLD,
    fake_aws.GITHUB_NEW,
    fake_aws.OTHER_TEAM_VALUE,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    require_tools("docker", "kind", "kubectl")
    created = CLUSTER not in run("kind", "get", "clusters").stdout.split()
    if created:
        run("kind", "create", "cluster", "--name", CLUSTER, "--wait", "180s", timeout=900)
    try:
        yield CLUSTER
    finally:
        if created and os.environ.get("E2E_KEEP_CLUSTER") != "1":
            run("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


@pytest.fixture(scope="module")
def images(cluster: str) -> None:
    if os.environ.get("E2E_SKIP_BUILD") != "1":
        run("docker", "build", "-t", OPERATOR_IMAGE, "-f", "Dockerfile", ".", timeout=1800)
        run("docker", "build", "-t", FAKE_AWS_IMAGE, "-f", "tests/e2e/moto.Dockerfile", ".", timeout=1800)
    for image in (OPERATOR_IMAGE, FAKE_AWS_IMAGE):
        run("kind", "load", "docker-image", image, "--name", cluster, timeout=600)


@pytest.fixture(scope="module")
def installed(images: None) -> Iterator[None]:
    kubectl("apply", "-k", "tests/e2e/overlay")
    kubectl("wait", "--for=condition=Established", "crd/connectorcredentials.connectors.xpander.ai", "--timeout=60s")
    kubectl("-n", NAMESPACE, "rollout", "status", "deploy/moto", "--timeout=300s", timeout=330)
    kubectl("-n", NAMESPACE, "rollout", "status", "deploy/xpander-controller", "--timeout=300s", timeout=330)
    yield
    if os.environ.get("E2E_KEEP_CLUSTER") != "1":
        kubectl("delete", "-f", "deploy/samples/", "--ignore-not-found", "--wait=false", check=False)
        kubectl("delete", "-k", "tests/e2e/overlay", "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def samples(installed: None) -> dict[str, str]:
    """Apply deploy/samples with the seeded secrets' ARNs; return the ARNs by sample name."""
    proxy = f"/api/v1/namespaces/{NAMESPACE}/services/http:moto:5000/proxy/_e2e/seeded"
    seeded = json.loads(kubectl("get", "--raw", proxy).stdout)
    docs = [
        d
        for path in sorted((REPO / "deploy" / "samples").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    arns = {}
    for doc in docs:
        secret_name = doc["spec"]["secretArn"].split(":secret:", 1)[1][: -len("-AbCdEf")]
        doc["spec"]["secretArn"] = seeded["arns"].get(secret_name, doc["spec"]["secretArn"])
        arns[doc["metadata"]["name"]] = doc["spec"]["secretArn"]
    assert set(seeded["arns"]) == {fake_aws.SLACK, fake_aws.JIRA, fake_aws.GITHUB, fake_aws.OTHER_TEAM}
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    return arns


def controller_exec(*command: str, check: bool = True) -> tuple[int, str, str]:
    done = kubectl(
        "-n", NAMESPACE, "exec", "deploy/xpander-controller", "-c", "controller", "--", *command, check=check
    )
    return done.returncode, done.stdout, done.stderr


def test_readable_secrets_become_ready(samples: dict[str, str]) -> None:
    kubectl(
        "-n", NAMESPACE, "wait", "--for=condition=Ready", "--timeout=180s",
        "connectorcredential/slack", "connectorcredential/jira", "connectorcredential/github",
        timeout=200,
    )  # fmt: skip
    for name in ("slack", "jira", "github"):
        condition = ready_condition(name)
        assert condition is not None
        assert (condition["status"], condition["reason"]) == ("True", "AccessVerified"), condition
    described = kubectl("-n", NAMESPACE, "describe", "connectorcredential", "slack").stdout
    assert "AccessVerified" in described
    assert samples["slack"] in described
    listed = kubectl("-n", NAMESPACE, "get", "ccred").stdout
    assert all(name in listed for name in samples)


@pytest.mark.parametrize(
    ("name", "reason", "hint"),
    [
        ("denied", "AccessDenied", ROLE_ARN),
        ("missing", "SecretNotFound", "us-east-1"),
    ],
)
def test_unreadable_secrets_say_why(samples: dict[str, str], name: str, reason: str, hint: str) -> None:
    def settled() -> dict[str, str] | None:
        condition = ready_condition(name)
        return condition if condition and condition.get("reason") == reason else None

    condition = wait_for(f"ccred/{name} Ready=False reason={reason}", settled)
    assert condition["status"] == "False"
    assert hint in condition["message"]
    described = kubectl("-n", NAMESPACE, "describe", "connectorcredential", name).stdout
    assert reason in described


def test_controller_reads_credentials_through_the_socket(samples: dict[str, str]) -> None:
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "--timeout=180s", "connectorcredential/slack")
    _, out, _ = controller_exec("connector-credentials", "get", f"{NAMESPACE}/slack", "--show")
    assert fake_aws.SLACK_VALUE in out
    assert samples["slack"] in out
    _, out, _ = controller_exec("connector-credentials", "get", f"{NAMESPACE}/jira", "--show")
    assert fake_aws.JIRA_TOKEN in out
    assert "bot@example.com" not in out  # jsonKey: only the one key is served
    _, out, _ = controller_exec("connector-credentials", "get", f"{NAMESPACE}/github", "--show")
    assert fake_aws.GITHUB_OLD in out  # versionStage AWSPREVIOUS
    assert fake_aws.GITHUB_NEW not in out
    _, out, _ = controller_exec("connector-credentials", "get", f"{NAMESPACE}/slack")
    assert fake_aws.SLACK_VALUE not in out  # masked without --show
    code, out, err = controller_exec("connector-credentials", "get", f"{NAMESPACE}/denied", "--show", check=False)
    assert code != 0
    assert fake_aws.OTHER_TEAM_VALUE not in out + err
    _, out, _ = controller_exec("connector-credentials", "list", "--socket-path", SOCKET)
    assert all(name in out for name in samples)


def test_irsa_environment_is_what_the_webhook_injects(installed: None) -> None:
    done = kubectl(
        "-n", NAMESPACE, "exec", "deploy/xpander-controller", "-c", "connector-credentials", "--",
        "python", "-c", "import os; print(os.environ['AWS_ROLE_ARN']); "
        "print(len(open(os.environ['AWS_WEB_IDENTITY_TOKEN_FILE']).read()) > 0)",
    )  # fmt: skip
    assert done.stdout.split() == [ROLE_ARN, "True"]


def test_values_stay_out_of_kubernetes_and_logs(samples: dict[str, str]) -> None:
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "--timeout=180s", "connectorcredential/slack")
    controller_exec("connector-credentials", "get", f"{NAMESPACE}/slack", "--show")
    exposed = "\n".join(
        kubectl(*args, check=False).stdout
        for args in (
            ("-n", NAMESPACE, "get", "connectorcredentials", "-o", "yaml"),
            ("-n", NAMESPACE, "get", "secrets,configmaps", "-o", "yaml"),
            ("-n", NAMESPACE, "get", "events", "-o", "yaml"),
            # The operator runs with CCRED_VERBOSE=true here (DEBUG logging).
            ("-n", NAMESPACE, "logs", "deploy/xpander-controller", "-c", "connector-credentials"),
            ("-n", NAMESPACE, "logs", "deploy/xpander-controller", "-c", "controller"),
        )
    )
    leaked = [value for value in VALUES if value in exposed]
    assert not leaked, f"secret values found in Kubernetes objects or logs: {leaked}"


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("get", "secrets", "no"),
        ("list", "secrets", "no"),
        ("watch", "connectorcredentials.connectors.xpander.ai", "yes"),
        ("patch", "connectorcredentials.connectors.xpander.ai/status", "yes"),
        ("delete", "connectorcredentials.connectors.xpander.ai", "no"),
        ("create", "events", "yes"),
    ],
)
def test_service_account_has_least_privilege(installed: None, verb: str, resource: str, allowed: str) -> None:
    resource, _, subresource = resource.partition("/")
    extra = ("--subresource", subresource) if subresource else ()
    done = kubectl("auth", "can-i", verb, resource, *extra, "-n", NAMESPACE, "--as", SERVICE_ACCOUNT, check=False)
    assert done.stdout.strip() == allowed, done.stderr
