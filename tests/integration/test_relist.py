"""A watch that lost its place: what was deleted meanwhile is forgotten after the re-list.

When kopf's watch cannot resume (410 Gone: its resourceVersion was compacted away, or the API
server restarted with an empty watch cache), kopf lists the objects again and watches on from
there. That listing sends no DELETED for an object that vanished while the watch was down, so
the operator lists the credentials itself and forgets what is no longer there (issue #17,
defect 10). The deletion is made in etcd while the API server is stopped: no watch can report
it, as when a delete happens during an outage and the history is compacted before the
operator's watch comes back.
"""

from __future__ import annotations

import base64
import re

from connector_credentials.api.models import GROUP, PLURAL
from connector_credentials.client import CredentialClient, CredentialNotFound, CredentialUnavailable
from tests.integration.conftest import World
from tests.support.controlplane import ControlPlane
from tests.support.kube import SERVICE_ACCOUNT, shipped_rbac
from tests.support.runner import wait_until


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _answer(client: CredentialClient, namespace: str, name: str) -> int:
    """The HTTP status the socket answers for one credential."""
    try:
        client.get(namespace, name)
    except (CredentialNotFound, CredentialUnavailable) as exc:
        assert exc.status is not None
        return exc.status
    return 200


def _delete_behind_the_apis_back(plane: ControlPlane, objects: list[tuple[str, str]]) -> None:
    """With the API server stopped: delete in etcd, then compact the history past the deletions."""
    for namespace, name in objects:
        answer = plane.etcd("kv/deleterange", {"key": _b64(f"/registry/{GROUP}/{PLURAL}/{namespace}/{name}")})
        assert answer.get("deleted") == "1", (namespace, name, answer)
    # One more write, then compaction at its revision: the deletions' revisions are gone from the
    # store's history too, so no watch (the API server's cache or etcd's) can start before them.
    bumped = plane.etcd("kv/put", {"key": _b64("/ccred-test/bump"), "value": ""})
    plane.etcd("kv/compaction", {"revision": bumped["header"]["revision"], "physical": True})


def _delete_while_the_api_is_down(world: World, plane: ControlPlane, objects: list[tuple[str, str]]) -> None:
    """Stop the API server, delete ``objects`` behind its back, start it again, and return once it
    authorizes the operator again. Until then (its RBAC cache fills after /readyz) the proxy
    answers 503, as a load balancer in front of it would."""
    outage = world.kube.fail_requests(None, r"^/api", status=503, times=None)
    plane.stop_apiserver()
    try:
        _delete_behind_the_apis_back(plane, objects)
    finally:
        plane.start_apiserver()
    namespaces = {namespace for namespace, _ in objects}
    wait_until(
        lambda: all(_may_watch(world, namespace) for namespace in namespaces),
        timeout=30,
        message="the restarted API server never authorized the operator",
    )
    outage.times = 0


def _may_watch(world: World, namespace: str) -> bool:
    """Whether the API server's authorizer lets the operator's ServiceAccount watch in ``namespace``."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{world.namespace}:{SERVICE_ACCOUNT}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{world.namespace}", "system:authenticated"],
            "resourceAttributes": {"verb": "watch", "group": GROUP, "resource": PLURAL, "namespace": namespace},
        },
    }
    answer = world.cluster.create("authorization.k8s.io/v1/subjectaccessreviews", None, review)
    return bool((answer.get("status") or {}).get("allowed"))


def test_credentials_deleted_while_the_watch_was_down_are_forgotten_after_the_relist(
    world: World, plane: ControlPlane
) -> None:
    ns = world.namespace
    # A second namespace, watched by the same operator, whose only credential is deleted: its own
    # re-list is empty (kopf delivers nothing for it), and it must be caught all the same.
    other = f"{ns}-b"
    world.cluster.create_namespace(other)
    for doc in shipped_rbac(other):
        for subject in doc.get("subjects") or []:
            subject["name"], subject["namespace"] = SERVICE_ACCOUNT, ns
        scope = other if doc["kind"] in ("Role", "RoleBinding") else None
        world.cluster.apply(f"rbac.authorization.k8s.io/v1/{doc['kind'].lower()}s", scope, doc)
    arns = {name: world.secret(name) for name in ("gone", "kept", "alone", "fresh")}
    world.apply("gone", {"secretArn": arns["gone"]})
    world.apply("kept", {"secretArn": arns["kept"]})
    world.cluster.create(
        "connectors.xpander.ai/v1alpha1/connectorcredentials",
        other,
        {
            "apiVersion": "connectors.xpander.ai/v1alpha1",
            "kind": "ConnectorCredential",
            "metadata": {"name": "alone", "namespace": other},
            "spec": {"secretArn": arns["alone"]},
        },
    )
    operator = world.start_operator(args=("-n", other))
    world.wait_reason("gone", "AccessVerified")
    world.wait_reason("kept", "AccessVerified")
    with world.client() as client:
        wait_until(client.healthy, timeout=20, message="the operator never became healthy")
        kept = client.get(ns, "kept").value
        assert client.get(ns, "gone").arn == arns["gone"]
        assert client.get(other, "alone").arn == arns["alone"]

        # kopf's first listing is no re-list: the operator listed once at start, and only once.
        assert "listing them to find deletions" not in operator.output

        collection = re.compile(rf"^/apis/{GROUP}/v1alpha1/namespaces/{ns}/{PLURAL}$")
        before = len(world.kube.requests("GET", collection))
        _delete_while_the_api_is_down(world, plane, [(ns, "gone"), (other, "alone")])
        assert world.get("gone") is None
        # Created once the API is back, while the operator's watch may still be re-listing: kept.
        world.apply("fresh", {"secretArn": arns["fresh"]})

        # kopf's watch resumes from a compacted resourceVersion, is answered 410 and lists again
        # (a GET of the collection without ?watch, by kopf, not the operator's own listing): the
        # precondition of what follows.
        def kopf_listed() -> bool:
            return any(
                seen.status == 200 and "watch=" not in seen.query and seen.user_agent.startswith("kopf")
                for seen in world.kube.requests("GET", collection)[before:]
            )

        wait_until(
            kopf_listed,
            timeout=60,
            message="the operator's watch never listed again after the API server restarted",
        )
        wait_until(
            lambda: (_answer(client, ns, "gone"), _answer(client, other, "alone")) == (404, 404),
            timeout=20,
            message="credentials deleted while the watch was down are still served after the re-list "
            f"(gone: {_answer(client, ns, 'gone')}, alone: {_answer(client, other, 'alone')})",
        )
        operator.wait_for_log(f"Forgot {ns}/gone: it is not in a fresh listing of the API", timeout=5)
        operator.wait_for_log(f"Forgot {other}/alone: it is not in a fresh listing of the API", timeout=5)
        assert client.get(ns, "kept").value == kept
        world.wait_reason("fresh", "AccessVerified", timeout=20)
        assert client.get(ns, "fresh").arn == arns["fresh"]
    for name in ("kept", "fresh"):
        assert f"Forgot {ns}/{name}:" not in operator.output


def test_every_credential_deleted_while_the_watch_was_down_is_forgotten_by_the_periodic_listing(
    world: World, plane: ControlPlane
) -> None:
    """The re-list then delivers no object at all, so nothing shows that it happened: the periodic
    listing (CCRED_RELIST_INTERVAL) finds what is gone."""
    ns = world.namespace
    arns = {name: world.secret(name) for name in ("one", "two")}
    for name, arn in arns.items():
        world.apply(name, {"secretArn": arn})
    operator = world.start_operator(extra_env={"CCRED_RELIST_INTERVAL": "3s"})
    for name in arns:
        world.wait_reason(name, "AccessVerified")
    with world.client() as client:
        wait_until(client.healthy, timeout=20, message="the operator never became healthy")
        _delete_while_the_api_is_down(world, plane, [(ns, "one"), (ns, "two")])
        wait_until(
            lambda: (_answer(client, ns, "one"), _answer(client, ns, "two")) == (404, 404),
            timeout=30,
            message="credentials deleted while the watch was down are still served "
            f"(one: {_answer(client, ns, 'one')}, two: {_answer(client, ns, 'two')})",
        )
    operator.wait_for_log(f"Forgot {ns}/one: it is not in a fresh listing of the API", timeout=5)
