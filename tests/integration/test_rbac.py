"""The shipped RBAC against an API server that enforces it: it suffices (no 403, checked after
every test by the ``world`` fixture), it is least-privilege (every verb granted is used), and the
operator is healthy only once it really watches ConnectorCredentials."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector_credentials.client import CredentialClient
from tests.integration.conftest import RESOURCE, World
from tests.support.controlplane import ControlPlane
from tests.support.kube import Cluster, shipped_rbac
from tests.support.kubeproxy import Seen
from tests.support.runner import OperatorProcess, console_script, wait_until

_CORE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
_GROUP = re.compile(
    r"^/apis/(?P<group>[^/]+)/[^/]+/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)
#: Discovery: non-resource URLs every authenticated user may read (the system:discovery role).
_DISCOVERY = re.compile(r"^/(api|apis|version)(/[^/]+){0,2}/?$")


def permission(seen: Seen) -> tuple[str, str, str, str]:
    """(namespace, apiGroup, resource[/subresource], verb) that RBAC checks for a request."""
    match = _CORE.match(seen.path) or _GROUP.match(seen.path)
    assert match, f"not a namespaced resource request: {seen.method} {seen.path}"
    parts = match.groupdict()
    resource = parts["resource"] + (f"/{parts['sub']}" if parts.get("sub") else "")
    query = urllib.parse.parse_qs(seen.query)
    if seen.method == "GET":
        verb = "get" if parts["name"] else ("watch" if query.get("watch") in (["true"], ["1"]) else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[seen.method]
    return parts["ns"], parts.get("group") or "", resource, verb


def granted(namespace: str) -> set[tuple[str, str, str, str]]:
    found = set()
    for doc in shipped_rbac(namespace):
        if doc["kind"] != "Role":
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        found.add((namespace, group, resource, verb))
    return found


def test_the_operator_uses_every_verb_it_is_granted_and_nothing_else(world: World) -> None:
    started = time.monotonic()
    world.apply("slack", {"secretArn": world.secret("slack")})
    # A conflicting status write makes the operator re-read the object (the `get` it is granted).
    world.kube.fail_status_patches(times=1, status=409)
    operator = world.start_operator()
    world.wait_reason("slack", "AccessVerified")
    wait_until(lambda: world.events("slack"), timeout=10, message="no Event for slack")
    operator.wait_for_log("changed since it was read (HTTP 409", timeout=10)
    operator.stop()

    requests = [seen for seen in world.kube.seen if seen.at >= started and not _DISCOVERY.match(seen.path)]
    used = {permission(seen) for seen in requests}
    assert used == granted(world.namespace), {
        "used but not granted": used - granted(world.namespace),
        "granted but unused": granted(world.namespace) - used,
    }
    refused = [seen for seen in world.kube.seen if seen.at >= started and seen.status == 403]
    assert not refused, refused


def test_the_role_grants_no_secrets_and_nothing_cluster_wide(world: World) -> None:
    docs = shipped_rbac(world.namespace)
    assert {doc["kind"] for doc in docs} == {"Role", "RoleBinding"}
    for _, _, resource, _ in granted(world.namespace):
        assert resource not in ("secrets", "configmaps", "namespaces", "customresourcedefinitions")
    # And the API server agrees: the operator's own identity may not read Secrets.
    review = world.cluster.checked(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{world.namespace}:xpander-controller",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{world.namespace}",
                    "system:authenticated",
                ],
                "resourceAttributes": {"namespace": world.namespace, "verb": "get", "resource": "secrets"},
            },
        },
    )
    assert review["status"]["allowed"] is False


def probe(socket_path: str) -> subprocess.CompletedProcess[str]:
    """`connector-credentials healthz`, what the sidecar's startup probe runs."""
    return subprocess.run(
        [console_script(), "healthz", "--socket-path", socket_path],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def bare_plane() -> Iterator[ControlPlane]:
    """A control plane of its own, without the CRD (the shared one has it for every test)."""
    workdir = Path(tempfile.mkdtemp(prefix="ccred-cp-"))
    with ControlPlane(workdir=workdir) as plane:
        yield plane
    shutil.rmtree(workdir, ignore_errors=True)


def start_without_crd(bare_plane: ControlPlane, world: World) -> tuple[Cluster, OperatorProcess]:
    """The world's AWS side and helpers, but the operator talks to a cluster without the CRD."""
    cluster = Cluster(bare_plane)
    cluster.create_namespace(world.namespace)
    cluster.install_operator_identity(world.namespace)
    token = cluster.service_account_token(world.namespace)
    kubeconfig = cluster.write_kubeconfig(world.workdir / "bare.kubeconfig", token=token, namespace=world.namespace)
    return cluster, world.start_operator(extra_env={"KUBECONFIG": str(kubeconfig)})


def test_unhealthy_until_the_crd_is_applied_then_watching(bare_plane: ControlPlane, world: World) -> None:
    cluster, operator = start_without_crd(bare_plane, world)
    namespace = world.namespace
    operator.wait_for_log("the CRD is not installed (kubectl apply -f crds/)", timeout=15)
    with CredentialClient(world.socket_path, timeout=5) as client:
        assert client.healthy() is False
        assert probe(world.socket_path).returncode == 1  # the native sidecar's startup probe fails
        cluster.apply_crds()
        wait_until(client.healthy, timeout=30, message="/healthz never answered 200 after the CRD was applied")
        passed = probe(world.socket_path)
        assert (passed.returncode, passed.stdout.strip()) == (0, "ok")
        operator.wait_for_log("The ConnectorCredential CRD is installed now; starting the watch.", timeout=5)
        arn = world.secret("late")
        body = {
            "apiVersion": "connectors.xpander.ai/v1alpha1",
            "kind": "ConnectorCredential",
            "metadata": {"name": "late", "namespace": namespace},
            "spec": {"secretArn": arn},
        }
        cluster.create(RESOURCE, namespace, body)
        # Seen by the watch (not only by a listing at start): it was created after the operator became healthy.
        wait_until(
            lambda: any(item.get("status", {}).get("conditions") for item in cluster.list(RESOURCE, namespace)),
            timeout=20,
            message="the credential created after the CRD was applied never got a verdict",
        )
        assert client.get(namespace, "late").arn == arn


def test_sigterm_while_waiting_for_the_crd_exits_promptly(bare_plane: ControlPlane, world: World) -> None:
    _, operator = start_without_crd(bare_plane, world)
    operator.wait_for_log("the CRD is not installed", timeout=15)
    began = time.monotonic()
    operator.send_signal(signal.SIGTERM)
    assert operator.wait(timeout=15) == 0
    assert time.monotonic() - began < 5
    assert "Starting Kopf" not in operator.output  # it never started watching a CRD that never came
