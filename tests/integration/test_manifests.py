"""The kustomize trees render and say what docs/install-eks.md promises (needs kubectl only)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

SOCKET_DIR = "/var/run/connector-credentials"
SIDECAR = "connector-credentials"


def render(path: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    done = subprocess.run(["kubectl", "kustomize", path], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod's containers and its native sidecars (init containers with restartPolicy Always)."""
    spec = deployment["spec"]["template"]["spec"]
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    return {c["name"]: c for c in [*spec["containers"], *sidecars]}


def assert_hardened(container: dict[str, Any]) -> None:
    name = container["name"]
    security = container.get("securityContext", {})
    assert security.get("runAsNonRoot") is True, name
    assert security.get("readOnlyRootFilesystem") is True, name
    assert security.get("allowPrivilegeEscalation") is False, name
    assert security.get("capabilities", {}).get("drop") == ["ALL"], name
    assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
    assert "memory" in container["resources"]["limits"], name
    assert "livenessProbe" in container, name
    assert "readinessProbe" in container, name


def assert_sidecar_wired(deployment: dict[str, Any], controller: str = "controller") -> None:
    spec = deployment["spec"]["template"]["spec"]
    by_name = containers(deployment)
    sidecar, main = by_name[SIDECAR], by_name[controller]
    volume = next(v for v in spec["volumes"] if v["name"] == "connector-credentials-socket")
    assert "emptyDir" in volume
    for container in (sidecar, main):
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["connector-credentials-socket"]["mountPath"] == SOCKET_DIR, container["name"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CCRED_SOCKET_PATH"] == f"{SOCKET_DIR}/credentials.sock", container["name"]
    assert {m["name"]: m for m in main["volumeMounts"]}["connector-credentials-socket"]["readOnly"] is True
    # The pod's namespace in the environment, so that `doctor` (kubectl exec) sees it as `run` does.
    assert not [arg for arg in sidecar["args"] if arg.startswith("--namespace")]
    namespace = next(e for e in sidecar["env"] if e["name"] == "CCRED_NAMESPACE")
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "--liveness=http://0.0.0.0:8080/healthz" in sidecar["args"]
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # A native sidecar: started before the controller, once its socket says healthy; stopped after it.
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["exec"]["command"] == ["connector-credentials", "healthz"]
    assert_hardened(sidecar)


def test_deploy_renders_a_complete_install() -> None:
    docs = render("deploy")
    assert one(docs, "Namespace", "xpander")
    assert one(docs, "CustomResourceDefinition", "connectorcredentials.connectors.xpander.ai")
    account = one(docs, "ServiceAccount", "xpander-controller")
    assert account["metadata"]["namespace"] == "xpander"
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/.+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    )
    deployment = one(docs, "Deployment", "xpander-controller")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "xpander-controller"
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    assert set(containers(deployment)) == {"controller", SIDECAR}
    assert_sidecar_wired(deployment)
    for container in containers(deployment).values():
        assert_hardened(container)
        assert container["image"].endswith("/connector-credential-operator:0.1.0")


def test_rbac_is_least_privilege() -> None:
    docs = render("deploy")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = one(docs, "Role", "connector-credentials")
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == {
        ("connectors.xpander.ai", "connectorcredentials"): {"get", "list", "watch"},
        ("connectors.xpander.ai", "connectorcredentials/status"): {"patch"},
        ("", "events"): {"create"},
    }
    assert not [r for r in role["rules"] if "secrets" in r["resources"]]  # never Kubernetes Secrets
    binding = one(docs, "RoleBinding", "connector-credentials")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "xpander-controller", "namespace": "xpander"}]


def test_sidecar_component_patches_an_existing_controller() -> None:
    docs = render("deploy/examples/existing-controller")
    deployment = one(docs, "Deployment", "xpander-controller")
    assert set(containers(deployment)) == {"controller", SIDECAR}
    assert containers(deployment)["controller"]["image"] == "registry.example.com/xpander/controller:1.2.3"
    assert_sidecar_wired(deployment)
    env = {e["name"]: e.get("value") for e in containers(deployment)[SIDECAR]["env"]}
    # The controller's uid, and the sidecar's own (its startup probe connects as the image's 10001).
    assert env["CCRED_ALLOWED_UIDS"] == "1000,10001"
    assert one(docs, "Role", "connector-credentials")["metadata"]["namespace"] == "xpander"


def test_samples_are_plain_manifests() -> None:
    # `kubectl apply -f deploy/samples/` applies every YAML file there: no kustomization among them.
    docs = [
        d
        for path in sorted((REPO / "deploy" / "samples").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    by_name = {d["metadata"]["name"]: d for d in docs}
    assert set(by_name) == {"slack", "jira", "github", "denied", "missing"}
    assert all(d["kind"] == "ConnectorCredential" and d["metadata"]["namespace"] == "xpander" for d in docs)
    assert by_name["slack"]["spec"]["secretArn"] == (
        "arn:aws:secretsmanager:us-east-1:111122223333:secret:xpander/prod/slack-bot-token-AbCdEf"
    )
    assert by_name["jira"]["spec"]["jsonKey"] == "api_token"
    assert "versionStage" in by_name["github"]["spec"]
    assert ":secret:xpander/" not in by_name["denied"]["spec"]["secretArn"]


def without_aws_endpoint(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    sidecar = containers(one(docs, "Deployment", "xpander-controller"))[SIDECAR]
    sidecar["env"] = [e for e in sidecar["env"] if e["name"] != "AWS_ENDPOINT_URL"]
    return docs


@pytest.mark.parametrize(
    ("shipped", "images"),
    [
        ("deploy", {}),
        (
            "deploy/examples/existing-controller",
            {"registry.example.com/xpander/controller:1.2.3": "localhost/ccred-standin-controller:e2e"},
        ),
    ],
)
def test_the_e2e_overlays_change_only_the_aws_endpoint_and_named_images(shipped: str, images: dict[str, str]) -> None:
    """What the e2e suite installs is what users install: the overlays' contract (their comments)."""
    overlay = render(f"tests/e2e/overlays/{Path(shipped).name}")
    sidecar = containers(one(overlay, "Deployment", "xpander-controller"))[SIDECAR]
    assert {e["name"]: e.get("value") for e in sidecar["env"]}["AWS_ENDPOINT_URL"] == "http://10.87.0.2:5000"
    expected = render(shipped)
    for container in containers(one(expected, "Deployment", "xpander-controller")).values():
        container["image"] = images.get(container["image"], container["image"])
    assert without_aws_endpoint(overlay) == expected
    # IRSA is the EKS webhook's to inject (tests/localnode runs it), not the overlay's.
    assert "AWS_ROLE_ARN" not in json.dumps(overlay)


def test_the_kind_overlay_injects_irsa_like_the_eks_webhook() -> None:
    docs = render("tests/e2e/overlays/kind/deploy")
    deployment = one(docs, "Deployment", "xpander-controller")
    sidecar = containers(deployment)[SIDECAR]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
    assert (
        env["AWS_ROLE_ARN"]
        == (one(docs, "ServiceAccount", "xpander-controller")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    )
    token = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "aws-iam-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "sts.amazonaws.com"
    for container in containers(one(render("tests/e2e/overlays/kind/aws"), "Deployment", "moto")).values():
        assert_hardened(container)


def test_iam_templates_are_least_privilege() -> None:
    policy = json.loads((REPO / "deploy/iam/policy.json").read_text())
    secrets = next(s for s in policy["Statement"] if s["Sid"] == "ReadXpanderConnectorSecrets")
    assert sorted(secrets["Action"]) == ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    assert secrets["Resource"] == "arn:aws:secretsmanager:REGION:ACCOUNT_ID:secret:xpander/ENV/*"
    # BatchGetSecretValue has no resource-level permissions: "*" is the only way, and it grants no secret.
    batch = next(s for s in policy["Statement"] if s["Sid"] == "BatchReadsOneCallPerTwentySecrets")
    assert (batch["Action"], batch["Resource"]) == ("secretsmanager:BatchGetSecretValue", "*")
    kms = next(s for s in policy["Statement"] if s["Action"] == "kms:Decrypt")
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": "secretsmanager.REGION.amazonaws.com"}}
    trust = json.loads((REPO / "deploy/iam/trust-policy.json").read_text())
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Condition"]["StringEquals"] == {
        "OIDC_PROVIDER:sub": "system:serviceaccount:NAMESPACE:SERVICE_ACCOUNT",
        "OIDC_PROVIDER:aud": "sts.amazonaws.com",
    }
    # EKS Pod Identity: the service principal, with the session tags it sets.
    pod = json.loads((REPO / "deploy/iam/pod-identity-trust-policy.json").read_text())
    (statement,) = pod["Statement"]
    assert statement["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert sorted(statement["Action"]) == ["sts:AssumeRole", "sts:TagSession"]
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": "ACCOUNT_ID"}
    chained = json.loads((REPO / "deploy/iam/cross-account-trust-policy.json").read_text())
    (statement,) = chained["Statement"]
    # sts:TagSession: a Pod Identity session's tags are transitive, and the chained role must accept them.
    assert sorted(statement["Action"]) == ["sts:AssumeRole", "sts:TagSession"] and "AWS" in statement["Principal"]


def test_the_rotation_queue_is_off_by_default_and_the_documented_patch_sets_it(tmp_path: Path) -> None:
    def queue_urls(docs: list[dict[str, Any]]) -> dict[str, str | None]:
        found = {}
        for name, container in containers(one(docs, "Deployment", "xpander-controller")).items():
            for variable in container.get("env") or []:
                if variable["name"] == "CCRED_ROTATION_QUEUE_URL":
                    found[name] = variable.get("value")
        return found

    assert queue_urls(render("deploy")) == {}
    assert queue_urls(render("deploy/examples/existing-controller")) == {}
    # The patch docs/install-eks.md ("Rotation in seconds") tells users to add to their overlay's patches.
    guide = (REPO / "docs" / "install-eks.md").read_text()
    section = guide[guide.index("## Rotation in seconds") : guide.index("## 8. Best practices")]
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL) if "CCRED_ROTATION_QUEUE_URL" in b]
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy", tmp_path)],
        "patches": yaml.safe_load(textwrap.dedent(block)),
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    patched = render(str(tmp_path))
    urls = queue_urls(patched)
    assert list(urls) == [SIDECAR]
    assert re.fullmatch(r"https://sqs\.[a-z0-9-]+\.amazonaws\.com/\d{12}/connector-credentials-rotation", urls[SIDECAR])
    # Merged by name: the sidecar keeps the rest of its settings.
    assert_sidecar_wired(one(patched, "Deployment", "xpander-controller"))


def test_the_metrics_port_is_exposed_and_the_service_monitor_is_optional() -> None:
    docs = render("deploy")
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"], "the ServiceMonitor must stay optional"
    sidecar = containers(one(docs, "Deployment", "xpander-controller"))[SIDECAR]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"ccred-health": 8080, "metrics": 8081}
    assert "--metrics-bind-address=:8081" in sidecar["args"]  # not 8080: the liveness endpoint's
    monitoring = render("deploy/monitoring")
    service = one(monitoring, "Service", "connector-credentials-metrics")
    [port] = service["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("metrics", "metrics")
    pod_labels = one(docs, "Deployment", "xpander-controller")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(monitoring, "ServiceMonitor", "connector-credentials")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]
