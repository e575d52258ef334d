"""The CRD as the real API server enforces it: `kubectl apply` (client-side and server-side)
refuses bad objects with the CRD's own messages, `kubectl explain` prints its descriptions, and
`kubectl get` and `kubectl wait` use its printer columns and conditions."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from tests.support.kube import Cluster, KubeApiError, kubectl

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf"
RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    name = f"crd-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    return name


def manifest(name: str, namespace: str, **spec: Any) -> str:
    body = {
        "apiVersion": "connectors.xpander.ai/v1alpha1",
        "kind": "ConnectorCredential",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return json.dumps(body)


def apply(cluster: Cluster, text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", *extra, "-f", "-", input=text, check=False)


INVALID = [
    pytest.param({"secretArn": "slack-bot-token"}, ["spec.secretArn", "should match", "^arn:"], id="not-an-arn"),
    pytest.param(
        {"secretArn": ARN, "versionStage": "AWSCURRENT", "versionId": "a" * 32},
        ["versionStage and versionId are mutually exclusive; set one of them"],
        id="stage-and-id",
    ),
    pytest.param(
        {"secretArn": ARN, "refreshInterval": "1s"}, ["refreshInterval must be at least 5s"], id="too-frequent"
    ),
    # Client-side: "must be of type string"; server-side apply: "expected string, got ...".
    pytest.param({"secretArn": ARN, "refreshInterval": 30}, ["spec.refreshInterval", "string"], id="wrong-type"),
    pytest.param({"jsonKey": "token"}, ["spec.secretArn: Required value"], id="no-arn"),
]


@pytest.mark.parametrize("mode", ["client-side", "server-side"])
@pytest.mark.parametrize(("spec", "phrases"), INVALID)
def test_invalid_objects_are_refused_at_apply_time(
    cluster: Cluster, namespace: str, mode: str, spec: dict[str, Any], phrases: list[str]
) -> None:
    extra = ("--server-side",) if mode == "server-side" else ()
    result = apply(cluster, manifest("bad", namespace, **spec), *extra)
    assert result.returncode != 0, result.stdout
    assert '"bad" is invalid' in result.stderr or result.stderr.startswith("Error from server"), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert cluster.get(RESOURCE, namespace, "bad") is None  # nothing was stored


def test_an_edit_to_an_invalid_spec_is_refused_and_the_object_kept(cluster: Cluster, namespace: str) -> None:
    assert apply(cluster, manifest("slack", namespace, secretArn=ARN)).returncode == 0
    result = apply(cluster, manifest("slack", namespace, secretArn=ARN, refreshInterval="2s"))
    assert result.returncode != 0
    assert "refreshInterval must be at least 5s" in result.stderr
    kept = cluster.get(RESOURCE, namespace, "slack")
    assert kept is not None and "refreshInterval" not in kept["spec"]


def test_unknown_fields_are_refused_by_kubectl_and_pruned_by_the_api(cluster: Cluster, namespace: str) -> None:
    # kubectl asks for strict field validation: a typo is an error naming the field.
    typo = manifest("typo", namespace, secretArn=ARN, refreshIntreval="30s")
    result = apply(cluster, typo)
    assert result.returncode != 0
    assert 'unknown field "spec.refreshIntreval"' in result.stderr, result.stderr
    # A plain API request (no fieldValidation) is accepted with a warning; the field is dropped.
    created = cluster.create(RESOURCE, namespace, json.loads(typo))
    assert created["spec"] == {"secretArn": ARN}


def test_explain_prints_the_descriptions(cluster: Cluster) -> None:
    explained = " ".join(cluster.kubectl("explain", "connectorcredential.spec.secretArn").stdout.split())
    assert "The full ARN of the Secrets Manager secret" in explained
    assert "<name>-<6 characters>" in explained
    spec = cluster.kubectl("explain", "ccred.spec").stdout
    for field in ("secretArn", "jsonKey", "versionStage", "versionId", "refreshInterval"):
        assert field in spec


def test_printer_columns_come_from_the_server(cluster: Cluster, namespace: str) -> None:
    cluster.create(RESOURCE, namespace, json.loads(manifest("slack", namespace, secretArn=ARN)))
    listed = cluster.kubectl("get", "ccred", "-n", namespace).stdout.splitlines()
    assert listed[0].split() == ["NAME", "READY", "REASON", "AGE", "LAST", "CHECKED"]
    wide = cluster.kubectl("get", "ccred", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert "SECRET ARN" in wide[0] and "MESSAGE" in wide[0]
    assert ARN in wide[1]


def test_wait_for_ready_answers_for_the_named_object(cluster: Cluster, namespace: str) -> None:
    for name in ("good", "bad"):
        cluster.create(RESOURCE, namespace, json.loads(manifest(name, namespace, secretArn=ARN)))
    now = "2026-01-01T00:00:00Z"

    def ready(status: str, reason: str) -> dict[str, Any]:
        condition = {"type": "Ready", "status": status, "reason": reason, "message": "m", "lastTransitionTime": now}
        return {"status": {"conditions": [condition]}}

    cluster.patch(RESOURCE, namespace, "good", ready("True", "AccessVerified"), subresource="status")
    cluster.patch(RESOURCE, namespace, "bad", ready("False", "AccessDenied"), subresource="status")
    good = cluster.kubectl("wait", "--for=condition=Ready", "ccred/good", "-n", namespace, "--timeout=5s")
    assert good.stdout.strip() == "connectorcredential.connectors.xpander.ai/good condition met"
    bad = cluster.kubectl("wait", "--for=condition=Ready", "ccred/bad", "-n", namespace, "--timeout=1s", check=False)
    assert bad.returncode != 0
    assert "good" not in bad.stdout + bad.stderr


def test_status_is_validated_too(cluster: Cluster, namespace: str) -> None:
    cluster.create(RESOURCE, namespace, json.loads(manifest("slack", namespace, secretArn=ARN)))
    with pytest.raises(KubeApiError) as refused:
        cluster.patch(
            RESOURCE,
            namespace,
            "slack",
            {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}},
            subresource="status",
        )
    assert refused.value.status == 422


def test_kubectl_is_there() -> None:
    assert kubectl()
