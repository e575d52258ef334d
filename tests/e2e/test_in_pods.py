"""The operator in real pods, installed as a user installs it (``kubectl apply -k``), checked as a
user checks it (kubectl, the controller's own reads), once for deploy/ and once for
deploy/examples/existing-controller (the ``install`` fixture)."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import textwrap
import time
import uuid
from typing import Any

import pytest

from tests.e2e import fake_aws
from tests.e2e.clusters import NAMESPACE, OPERATOR_IMAGE, Cluster
from tests.e2e.install import Install, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SIDECAR, CONTROLLER = "connector-credentials", "controller"
ROLE_ARN = "arn:aws:iam::111122223333:role/xpander-controller"
SOCKET = "/var/run/connector-credentials/credentials.sock"
VALUES = (
    fake_aws.SLACK_VALUE,
    fake_aws.JIRA_TOKEN,
    fake_aws.GITHUB_OLD,
    fake_aws.GITHUB_NEW,
    fake_aws.OTHER_TEAM_VALUE,
)
#: Reads one credential with the client library, as a controller written in Python does.
READ_WITH_CLIENT = (
    "import sys; from connector_credentials.client import CredentialClient; "
    "print(CredentialClient().get(sys.argv[1], sys.argv[2]).value)"
)


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any]:
    statuses = pod["status"].get("initContainerStatuses", []) + pod["status"].get("containerStatuses", [])
    return next(status for status in statuses if status["name"] == name)


def containers_in_event_order(install: Install, pod: str, reason: str) -> list[str]:
    """The containers named by the pod's Events of one reason, in the order the API server stored them."""
    events = install.cluster.json(
        "-n", NAMESPACE, "get", "events", "--field-selector", f"involvedObject.name={pod},reason={reason}"
    )["items"]
    events.sort(key=lambda event: int(event["metadata"]["resourceVersion"]))
    # e.g. spec.initContainers{connector-credentials}
    return [event["involvedObject"].get("fieldPath", "").partition("{")[2].rstrip("}") for event in events]


def nanoseconds(timestamp: str) -> int:
    """A UTC RFC 3339 time with up to 9 decimals (Go trims trailing zeros), as integer nanoseconds."""
    whole, _, fraction = timestamp.removesuffix("Z").partition(".")
    seconds = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp()
    return int(seconds) * 10**9 + int(fraction.ljust(9, "0"))


def token_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


# --- the pod ---------------------------------------------------------------------------------


def test_controller_pod_is_ready_with_the_sidecar_started_first(install: Install) -> None:
    pod = install.pod()
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"]), pod["status"]
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)
    assert sidecar.get("restartPolicy") == "Always"  # a native sidecar
    started = containers_in_event_order(install, pod["metadata"]["name"], "Started")
    assert started == [SIDECAR, CONTROLLER]
    # The controller started after the sidecar passed its startup probe (the socket's /healthz).
    sidecar_status, controller_status = container_status(pod, SIDECAR), container_status(pod, CONTROLLER)
    assert sidecar_status["started"] is True
    assert sidecar_status["state"]["running"]["startedAt"] <= controller_status["state"]["running"]["startedAt"]


def test_irsa_comes_from_the_eks_webhook_not_from_the_manifests(install: Install) -> None:
    if not install.cluster.irsa_webhook:
        pytest.skip(f"{install.cluster.name} runs no EKS pod identity webhook")
    rendered = install.cluster.kubectl("kustomize", str(install.cluster.overlay(install.name))).stdout
    assert "AWS_ROLE_ARN" not in rendered
    assert "AWS_WEB_IDENTITY_TOKEN_FILE" not in rendered
    assert "sts.amazonaws.com" not in rendered.replace("eks.amazonaws.com/sts-regional-endpoints", "")
    pod = install.pod()
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["AWS_ROLE_ARN"] == ROLE_ARN
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "aws-iam-token")
    projected = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert projected["audience"] == "sts.amazonaws.com"
    token = install.exec(SIDECAR, "cat", env["AWS_WEB_IDENTITY_TOKEN_FILE"]).stdout
    claims = token_claims(token)
    assert claims["aud"] == ["sts.amazonaws.com"]
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:xpander-controller"
    # The downward API and the in-cluster login through the `kubernetes` Service's VIP.
    shown = install.exec(SIDECAR, "printenv", "CCRED_NAMESPACE", "KUBERNETES_SERVICE_HOST").stdout.split()
    service_ip = install.cluster.json("-n", "default", "get", "service", "kubernetes")["spec"]["clusterIP"]
    assert shown == [NAMESPACE, service_ip]


def test_the_containers_are_locked_down_and_the_operator_writes_nowhere(install: Install) -> None:
    probe = textwrap.dedent(
        """
        import os
        status = dict(line.split(":", 1) for line in open("/proc/1/status"))
        try:
            open("/probe-write", "w")
            root = "writable"
        except OSError as exc:
            root = os.strerror(exc.errno)
        print(os.getuid(), status["CapEff"].strip(), status["NoNewPrivs"].strip(), root)
        """
    )
    for container in (SIDECAR, CONTROLLER):
        uid, capabilities, no_new_privs, root = install.exec(container, "python", "-c", probe).stdout.split(" ", 3)
        assert int(uid) != 0, container
        assert int(capabilities, 16) == 0, container
        assert no_new_privs == "1", container
        assert root.strip() == "Read-only file system", container
    # Writable for the operator: its socket volume and /tmp. It writes only the socket.
    listed = install.exec(
        SIDECAR, "python", "-c",
        "import os; print(sorted(os.listdir('/var/run/connector-credentials')), sorted(os.listdir('/tmp')))",
    ).stdout.strip()  # fmt: skip
    assert listed == "['credentials.sock'] []"


# --- what users see --------------------------------------------------------------------------


def test_samples_reach_their_reasons_and_describe_shows_them(install: Install) -> None:
    expected = {
        "slack": ("True", "AccessVerified"),
        "jira": ("True", "AccessVerified"),
        "github": ("True", "AccessVerified"),
        "denied": ("False", "AccessDenied"),
        "missing": ("False", "SecretNotFound"),
    }
    for name, (status, reason) in expected.items():

        def settled(name: str = name, reason: str = reason) -> dict[str, Any] | None:
            condition = install.ready_condition(name)
            return condition if condition and condition.get("reason") == reason else None

        condition = wait_for(f"ccred/{name} reason {reason}", settled, timeout=120)
        assert condition["status"] == status, condition
        described = install.kubectl("describe", "connectorcredential", name).stdout
        assert reason in described
        assert install.arns[name] in described
    assert ROLE_ARN in (install.ready_condition("denied") or {})["message"]
    assert "us-east-1" in (install.ready_condition("missing") or {})["message"]


def test_the_controller_reads_values_over_the_socket_with_the_client_library(install: Install) -> None:
    wait_for("ccred/slack Ready", lambda: (install.ready_condition("slack") or {}).get("status") == "True")
    read = install.exec(CONTROLLER, "python", "-c", READ_WITH_CLIENT, NAMESPACE, "slack").stdout
    assert read.strip() == fake_aws.SLACK_VALUE
    read = install.exec(CONTROLLER, "python", "-c", READ_WITH_CLIENT, NAMESPACE, "jira").stdout
    assert read.strip() == fake_aws.JIRA_TOKEN  # jsonKey: one key of the JSON secret
    read = install.exec(CONTROLLER, "python", "-c", READ_WITH_CLIENT, NAMESPACE, "github").stdout
    assert read.strip() == fake_aws.GITHUB_OLD  # versionStage AWSPREVIOUS
    denied = install.exec(CONTROLLER, "connector-credentials", "get", f"{NAMESPACE}/denied", "--show", check=False)
    assert denied.returncode != 0
    assert fake_aws.OTHER_TEAM_VALUE not in denied.stdout + denied.stderr


def test_a_container_of_the_pod_running_as_another_uid_is_refused(install: Install) -> None:
    """An ephemeral container in the same pod, with the socket mounted and the pod's fsGroup (so the
    socket file itself admits it), but another uid: the operator answers 403."""
    pod = install.pod()["metadata"]["name"]
    request = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect("{SOCKET}")
        s.sendall(b"GET /v1/credentials/{NAMESPACE}/slack HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        print(answer.split(b"\\r\\n", 1)[0].decode(), {fake_aws.SLACK_VALUE!r}.encode() in answer)
        """
    )
    intruder = {
        "name": "other-uid",
        "image": OPERATOR_IMAGE,
        "command": ["python", "-c", request],
        "securityContext": {
            "runAsUser": 4242,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "connector-credentials-socket", "mountPath": "/var/run/connector-credentials"}],
    }
    install.kubectl(
        "patch", "pod", pod, "--subresource=ephemeralcontainers", "--type=strategic",
        "-p", json.dumps({"spec": {"ephemeralContainers": [intruder]}}),
    )  # fmt: skip

    def finished() -> bool:
        current = install.cluster.json("-n", NAMESPACE, "get", "pod", pod)
        statuses = current["status"].get("ephemeralContainerStatuses", [])
        return any(s["name"] == "other-uid" and "terminated" in s["state"] for s in statuses)

    wait_for("the other-uid container to finish", finished, timeout=60)
    said = install.kubectl("logs", pod, "-c", "other-uid").stdout.split()
    assert said[1] == "403", said
    assert said[-1] == "False"  # and no value in the answer


def test_doctor_passes_in_the_sidecar_and_prints_no_secret(install: Install) -> None:
    # doctor checks every credential of the namespace: the two samples that must fail go first.
    install.kubectl("delete", "connectorcredential", "denied", "missing", "--ignore-not-found")
    done = install.exec(SIDECAR, "connector-credentials", "doctor", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slack" in done.stdout
    assert not [value for value in VALUES if value in done.stdout + done.stderr]


def test_the_metrics_port_answers_from_another_pod(install: Install) -> None:
    pod_ip = install.pod()["status"]["podIP"]
    url = f"http://{pod_ip}:8081/metrics"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    overrides = {
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        }
    }
    install.kubectl(
        "run", "metrics-probe", f"--image={OPERATOR_IMAGE}", "--image-pull-policy=IfNotPresent", "--restart=Never",
        f"--overrides={json.dumps(overrides)}", "--command", "--", "python", "-c", fetch,
    )  # fmt: skip
    try:
        wait_for(
            "the metrics probe pod to succeed",
            lambda: (
                install.cluster.json("-n", NAMESPACE, "get", "pod", "metrics-probe")["status"].get("phase")
                in ("Succeeded", "Failed")
            ),
            timeout=60,
        )
        scraped = install.kubectl("logs", "metrics-probe").stdout
        assert "ccred_credentials{" in scraped
        assert not [value for value in VALUES if value in scraped]
    finally:
        install.kubectl("delete", "pod", "metrics-probe", "--wait=false", check=False)


def test_a_canary_value_is_found_only_in_the_socket_answer(install: Install, canary: str) -> None:
    aws = install.cluster.aws_client()
    arn = aws.create_secret(Name=f"xpander/prod/e2e-canary-{uuid.uuid4().hex[:8]}", SecretString=canary)["ARN"]
    credential = {
        "apiVersion": "connectors.xpander.ai/v1alpha1",
        "kind": "ConnectorCredential",
        "metadata": {"name": "canary", "namespace": NAMESPACE},
        "spec": {"secretArn": arn},
    }
    install.kubectl("apply", "-f", "-", stdin=json.dumps(credential))
    wait_for("ccred/canary Ready", lambda: (install.ready_condition("canary") or {}).get("status") == "True")
    answer = install.exec(CONTROLLER, "python", "-c", READ_WITH_CLIENT, NAMESPACE, "canary").stdout
    assert answer.strip() == canary  # the socket's answer is the one place it may be
    assert not find_everywhere(install.cluster, canary.encode())


def find_everywhere(cluster: Cluster, needle: bytes) -> list[str]:
    """Where ``needle`` shows up: every object of every listable kind (Events included), every
    container's log (previous ones too), etcd's data files and the node's daemon logs."""
    found = []
    kinds = cluster.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
    for kind in kinds:
        listed = cluster.kubectl("get", kind, "-A", "-o", "json", "--ignore-not-found", check=False).stdout
        if needle.decode() in listed:
            found.append(f"objects of kind {kind}")
    pods = cluster.json("get", "pods", "-A")["items"]
    for pod in pods:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        statuses = pod["status"].get("initContainerStatuses", []) + pod["status"].get("containerStatuses", [])
        for status in statuses:
            for previous in (False, True) if status.get("restartCount") else (False,):
                args = ["-n", namespace, "logs", name, "-c", status["name"]] + (["--previous"] if previous else [])
                if needle.decode() in cluster.kubectl(*args, check=False).stdout:
                    found.append(f"log of {namespace}/{name}/{status['name']}{' (previous)' if previous else ''}")
    try:
        files = cluster.etcd_files()
    except pytest.skip.Exception:
        files = []
    found += [f"etcd file {path}" for path in files if needle in path.read_bytes()]
    if needle.decode() in cluster.node_logs():
        found.append("the node's daemon logs")
    return found


# --- failures and updates --------------------------------------------------------------------


def controller_reads_in_a_loop(install: Install, pod: str, seconds: float) -> subprocess.Popen[str]:
    """The controller container of ``pod`` reading ``slack`` every 0.1 s with the client library,
    one line per read ("ok" or the error), until the container stops or ``seconds`` pass."""
    loop = textwrap.dedent(
        f"""
        import time
        from connector_credentials.client import CredentialClient, CredentialError
        client = CredentialClient(timeout=5)
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            try:
                client.get("{NAMESPACE}", "slack")
                print("ok", flush=True)
            except CredentialError as exc:
                print("FAILED", type(exc).__name__, exc.status, flush=True)
            time.sleep(0.1)
        """
    )
    return subprocess.Popen(
        ["kubectl", "--kubeconfig", str(install.cluster.kubeconfig), "-n", NAMESPACE, "exec", pod, "-c", CONTROLLER,
         "--", "python", "-c", loop],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_killed_sidecar_is_restarted_and_reads_recover_within_10s(install: Install) -> None:
    pod = install.pod()
    name, before = pod["metadata"]["name"], container_status(pod, SIDECAR)
    install.cluster.kill_container(before["containerID"])
    killed = time.monotonic()

    def restarted_and_serving() -> bool:
        done = install.exec(CONTROLLER, "python", "-c", READ_WITH_CLIENT, NAMESPACE, "slack", check=False, pod=name)
        return done.returncode == 0 and done.stdout.strip() == fake_aws.SLACK_VALUE

    wait_for("the controller's reads to recover", restarted_and_serving, timeout=30, interval=0.2)
    recovered_in = time.monotonic() - killed
    after = container_status(install.cluster.json("-n", NAMESPACE, "get", "pod", name), SIDECAR)
    assert after["restartCount"] == before["restartCount"] + 1
    assert after["lastState"]["terminated"]["exitCode"] == 137  # SIGKILL
    assert recovered_in <= 10, f"reads recovered {recovered_in:.1f} s after the kill"


def test_a_rolling_update_fails_no_read(install: Install) -> None:
    old = [pod["metadata"]["name"] for pod in install.pods()]
    readers = [controller_reads_in_a_loop(install, pod, seconds=120) for pod in old]
    wait_for("the readers to start", lambda: all(r.poll() is None for r in readers), timeout=10)
    time.sleep(1)  # a few reads before the restart; the verdict does not depend on it
    install.kubectl("rollout", "restart", "deploy/xpander-controller")
    install.kubectl("rollout", "status", "deploy/xpander-controller", "--timeout=180s", timeout=200)
    new = [pod["metadata"]["name"] for pod in install.pods() if pod["metadata"]["name"] not in old]
    assert new
    readers += [controller_reads_in_a_loop(install, pod, seconds=3) for pod in new]
    lines = []
    for reader in readers:
        out, _ = reader.communicate(timeout=180)
        lines += out.splitlines()
    failed = [line for line in lines if line != "ok"]
    assert not failed, failed[:10]
    assert len(lines) >= 20


def test_on_pod_deletion_the_sidecar_stops_after_the_controller(install: Install) -> None:
    pod = install.pod()
    ids = {
        name: container_status(pod, name)["containerID"].removeprefix("containerd://") for name in (SIDECAR, CONTROLLER)
    }
    with install.cluster.container_exits() as exits:
        began = time.monotonic()
        install.kubectl("delete", "pod", pod["metadata"]["name"], "--wait=true", "--timeout=120s", timeout=150)
        deleted_in = time.monotonic() - began
    sidecar, controller = exits[ids[SIDECAR]], exits[ids[CONTROLLER]]
    assert nanoseconds(controller[0]) < nanoseconds(sidecar[0]), exits
    # Both stopped on SIGTERM, in time: no one waited out the grace period and was killed.
    assert (controller[1], sidecar[1]) == (0, 0), exits
    assert deleted_in < 25
    install.kubectl("rollout", "status", "deploy/xpander-controller", "--timeout=120s", timeout=150)
