"""Cross-account roles: spec.roleArn assumed with sts:AssumeRole from the IRSA identity, through
moto's STS (moto keeps accounts apart: a secret of account 210987654321 is readable only with that
account's credentials), allowed by CCRED_ASSUMABLE_ROLES only; refusals through the FaultProxy."""

from __future__ import annotations

from tests.integration.conftest import World
from tests.support.roles import ALLOW, OTHER_ACCOUNT, READER, other_account_secret
from tests.support.runner import wait_until
from tests.support.scrape import free_port, samples, scrape, value


def test_an_allowed_role_is_assumed_and_its_session_shared(world: World) -> None:
    first, second = other_account_secret(world, "github"), other_account_secret(world, "jira")
    own = world.secret("slack")
    world.apply("github", {"secretArn": first, "roleArn": READER, "externalId": "xpander-tenant-1"})
    world.apply("jira", {"secretArn": second, "roleArn": READER, "externalId": "xpander-tenant-1"})
    world.apply("slack", {"secretArn": own})
    before = world.proxy.calls("AssumeRole")
    reads_before = world.proxy.calls("GetSecretValue") + world.proxy.calls("BatchGetSecretValue")
    port = free_port()
    world.start_operator(extra_env={**ALLOW, "CCRED_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}"})
    for name in ("github", "jira", "slack"):
        world.wait_reason(name, "AccessVerified")
    status = world.status("github")
    assert status["identityArn"].startswith(f"arn:aws:sts::{OTHER_ACCOUNT}:assumed-role/connector-reader/")
    assert status["credentialSource"] == "IRSA"  # the identity the role was assumed from
    assert "assumed-role/connector-reader" in (world.ready("jira") or {})["message"]
    assert world.status("slack")["identityArn"].startswith("arn:aws:sts::123456789012:assumed-role/xpander-controller/")
    # One session for both credentials of that role; refreshes (a refresh=true read) reuse it.
    with world.client() as client:
        assert client.get(world.namespace, "github", refresh=True).value in world.canaries
    assert world.proxy.calls("AssumeRole") - before == 1
    # The metrics count the role's calls too: its AssumeRole, and its reads beside the own identity's.
    found = samples(scrape(port))
    assert value(found, "ccred_aws_requests_total", operation="AssumeRole", outcome="ok") == 1
    reads = world.proxy.calls("GetSecretValue") + world.proxy.calls("BatchGetSecretValue") - reads_before
    counted = value(found, "ccred_aws_requests_total", operation="GetSecretValue") + value(
        found, "ccred_aws_requests_total", operation="BatchGetSecretValue"
    )
    assert counted == reads >= 3  # the role's batch or reads, slack's, the refresh
    # Reads as the role never share a call with reads as the operator's own identity.
    for seen in world.proxy.seen:
        if seen.secret_ids and any(world.prefix in secret_id for secret_id in seen.secret_ids):
            own_ids = [secret_id for secret_id in seen.secret_ids if ":123456789012:" in secret_id]
            assert not own_ids or len(own_ids) == len(seen.secret_ids), seen.secret_ids


def test_a_role_outside_the_allowlist_is_refused_without_calling_aws(world: World) -> None:
    arn = other_account_secret(world, "github")
    world.apply("github", {"secretArn": arn, "roleArn": f"arn:aws:iam::{OTHER_ACCOUNT}:role/admin"})
    world.apply("allowed", {"secretArn": arn, "roleArn": READER})
    world.start_operator(extra_env=ALLOW)
    condition = world.wait_reason("github", "RoleNotAllowed")
    assert condition["status"] == "False"
    assert f"arn:aws:iam::{OTHER_ACCOUNT}:role/admin" in condition["message"]
    assert "CCRED_ASSUMABLE_ROLES" in condition["message"]
    world.wait_reason("allowed", "AccessVerified")
    assert world.proxy.reads(f"{world.prefix}/github") == 1  # the allowed one's only


def test_no_role_is_allowed_by_default(world: World) -> None:
    arn = other_account_secret(world, "github")
    world.apply("github", {"secretArn": arn, "roleArn": READER})
    before = world.proxy.calls("AssumeRole")
    world.start_operator()
    condition = world.wait_reason("github", "RoleNotAllowed")
    assert "CCRED_ASSUMABLE_ROLES is empty" in condition["message"]
    assert world.proxy.calls("AssumeRole") == before
    assert world.proxy.reads(f"{world.prefix}/github") == 0


def test_sts_refusal_of_the_chained_role_is_assume_role_failed(world: World) -> None:
    before = world.proxy.calls("AssumeRole")
    world.proxy.add_rule(
        "AssumeRole",
        error_code="AccessDenied",
        message=f"User: arn:aws:sts::123456789012:assumed-role/xpander-controller/x is not authorized to perform: "
        f"sts:AssumeRole on resource: {READER}",
        status=403,
    )
    arn = other_account_secret(world, "github")
    world.apply("github", {"secretArn": arn, "roleArn": READER})
    world.start_operator(extra_env=ALLOW)
    condition = world.wait_reason("github", "AssumeRoleFailed")
    assert condition["status"] == "False"
    for phrase in (READER, "sts:AssumeRole", "trust policy", "spec.externalId", "AccessDenied"):
        assert phrase in condition["message"], phrase
    wait_until(lambda: world.proxy.calls("AssumeRole") > before, timeout=5, message="no AssumeRole call")
    assert world.proxy.reads(f"{world.prefix}/github") == 0
