"""Smoke tests of the test harness itself (connector_credentials_demo): emulators, proxy, runner."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector_credentials_demo.awsemu import AwsEmulator, irsa_env
from connector_credentials_demo.kube import KubeApiError, KubeEmulator
from connector_credentials_demo.proxy import FaultProxy
from connector_credentials_demo.runner import OperatorProcess, hermetic_env, wait_until

GROUP, VERSION, PLURAL = "smoke.example.com", "v1", "widgets"
RESOURCE = f"{GROUP}/{VERSION}/{PLURAL}"
REAL_CRD = Path(__file__).resolve().parents[2] / "crds" / "connectorcredentials.yaml"
SMALL_CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {PLURAL}.{GROUP}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{kind: Widget, plural: {PLURAL}, singular: widget, shortNames: [wdg]}}
  versions:
    - name: {VERSION}
      served: true
      storage: true
      subresources: {{status: {{}}}}
      additionalPrinterColumns:
        - {{name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}}
        - {{name: Age, type: date, jsonPath: .metadata.creationTimestamp}}
      schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"""


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEmulator]:
    crd = tmp_path_factory.mktemp("crd") / "crd.yaml"
    crd.write_text(SMALL_CRD, encoding="utf-8")
    with KubeEmulator() as emulator:
        emulator.load_crd(crd)
        for n in range(1, 6):
            emulator.create_namespace(f"ns{n}")
        yield emulator


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsEmulator]:
    with AwsEmulator() as emulator:
        yield emulator


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


# -- Kubernetes emulator ---------------------------------------------------------------------------


def test_kubernetes_client_through_kubeconfig(kube: KubeEmulator, tmp_path: Path) -> None:
    from kubernetes import client, config

    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    with config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        custom = client.CustomObjectsApi(api_client)
        created = custom.create_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, widget("w1", size=1))
        meta = created["metadata"]
        assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
        rv1 = int(meta["resourceVersion"])

        patched = custom.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "w1", {"spec": {"size": 2}})
        assert patched["spec"] == {"size": 2}
        assert patched["metadata"]["generation"] == 2 and int(patched["metadata"]["resourceVersion"]) > rv1

        status = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        after = custom.patch_namespaced_custom_object_status(GROUP, VERSION, "ns1", PLURAL, "w1", status)
        assert after["status"] == status["status"] and after["metadata"]["generation"] == 2  # status: no bump

        ignored = custom.patch_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL, "w1", {"status": {"x": 1}})
        assert ignored["status"] == status["status"]  # the main resource ignores status changes

        listing = custom.list_namespaced_custom_object(GROUP, VERSION, "ns1", PLURAL)
        assert listing["kind"] == "WidgetList" and [o["metadata"]["name"] for o in listing["items"]] == ["w1"]

        core = client.CoreV1Api(api_client)
        names = set()
        for n in range(2):  # kmock alone answers the second one with 409
            event = core.create_namespaced_event(
                "ns1",
                {
                    "metadata": {"generateName": "w1-"},
                    "reason": "Checked",
                    "message": f"try {n}",
                    "type": "Normal",
                    "involvedObject": {"kind": "Widget", "name": "w1", "namespace": "ns1", "apiVersion": RESOURCE},
                },
            )
            assert event.metadata.name.startswith("w1-") and len(event.metadata.name) == len("w1-") + 5
            names.add(event.metadata.name)
        assert len(names) == 2

        namespaces = [ns.metadata.name for ns in core.list_namespace().items]  # kmock alone fails this
        assert {"default", "ns1"} <= set(namespaces)
        with pytest.raises(client.ApiException) as missing:
            core.create_namespaced_event(
                "nowhere", {"metadata": {"generateName": "x-"}, "involvedObject": {"name": "w1"}}
            )
        assert missing.value.status == 404  # no objects in namespaces that do not exist

    assert {e["message"] for e in kube.events("ns1")} == {"try 0", "try 1"}
    assert {(e["apiVersion"], e["kind"]) for e in kube.events("ns1")} == {("v1", "Event")}
    everything = kube.list_objects()
    assert any(o["metadata"]["name"] == "w1" for o in everything)
    assert any(o.get("kind") == "CustomResourceDefinition" for o in everything)  # the CRD is stored too
    assert kube.delete(RESOURCE, "ns1", "w1") is not None
    assert kube.get(RESOURCE, "ns1", "w1") is None


def test_write_semantics(kube: KubeEmulator) -> None:
    kube.create(RESOURCE, "ns2", widget("w2", size=1))
    with pytest.raises(KubeApiError) as conflict:
        kube.create(RESOURCE, "ns2", widget("w2"))
    assert conflict.value.status == 409

    before = kube.get(RESOURCE, "ns2", "w2")
    assert before is not None
    same = kube.patch(RESOURCE, "ns2", "w2", {"spec": {"size": 1}})
    assert same["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # no-op: no write

    # kopf's JSON patch with an optimistic-concurrency test on resourceVersion.
    rv = before["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["smoke/finalizer"]},
    ]
    with_finalizer = kube.patch(RESOURCE, "ns2", "w2", ops)
    assert with_finalizer["metadata"]["finalizers"] == ["smoke/finalizer"]
    with pytest.raises(KubeApiError) as stale:
        kube.patch(RESOURCE, "ns2", "w2", ops)  # same resourceVersion again: now stale
    assert stale.value.status == 422

    deleting = kube.delete(RESOURCE, "ns2", "w2")
    assert deleting is not None and deleting["metadata"]["deletionTimestamp"]
    assert kube.get(RESOURCE, "ns2", "w2") is not None  # held by the finalizer
    kube.patch(RESOURCE, "ns2", "w2", {"metadata": {"finalizers": None}})
    assert kube.get(RESOURCE, "ns2", "w2") is None


@contextlib.contextmanager
def _watch(kube: KubeEmulator, namespace: str, timeout_seconds: int | None = None) -> Iterator[Any]:
    url = urllib.parse.urlsplit(kube.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=5)
    query = "?watch=true" + (f"&timeoutSeconds={timeout_seconds}" if timeout_seconds is not None else "")
    try:
        conn.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}{query}")
        response = conn.getresponse()
        assert response.status == 200
        yield response
    finally:
        conn.close()  # closes the response too


def _next_event(response: Any) -> dict[str, Any]:
    line = b""
    while not line.strip():
        line = response.readline()
        assert line, "the watch stream ended"
    event: dict[str, Any] = json.loads(line)
    return event


def test_watch_stream_sees_patch_and_can_be_dropped(kube: KubeEmulator) -> None:
    kube.create(RESOURCE, "ns3", widget("w3"))
    with _watch(kube, "ns3") as response:
        assert _next_event(response)["type"] == "ADDED"
        kube.patch(RESOURCE, "ns3", "w3", {"status": {"phase": "Ready"}}, subresource="status")
        event = _next_event(response)
        assert event["type"] == "MODIFIED" and event["object"]["status"] == {"phase": "Ready"}
        wait_until(lambda: kube.active_watches >= 1, timeout=2, message="the watch is not registered")
        assert kube.drop_watches() >= 1
        assert response.read() == b""  # the stream ends, as after an API server restart

    with _watch(kube, "ns3", timeout_seconds=0) as timed:
        assert _next_event(timed)["type"] == "ADDED"
        assert timed.read() == b""  # timeoutSeconds is honoured


def test_fault_injection(kube: KubeEmulator, tmp_path: Path) -> None:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    kube.create(RESOURCE, "ns4", widget("w4"))
    fault = kube.fail_status_patches(times=1, status=409)
    with config.new_client_from_config(config_file=str(kube.write_kubeconfig(tmp_path / "kc"))) as api_client:
        custom = client.CustomObjectsApi(api_client)
        body = {"status": {"phase": "x"}}
        with pytest.raises(ApiException) as failed:
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, "ns4", PLURAL, "w4", body)
        assert failed.value.status == 409 and json.loads(failed.value.body)["reason"] == "Conflict"
        assert custom.patch_namespaced_custom_object_status(GROUP, VERSION, "ns4", PLURAL, "w4", body)["status"]
        assert fault.hits == 1 and not fault.active

        kube.fail_requests("GET", re.compile(r"/widgets/w4$"), status=500, times=None)
        with pytest.raises(ApiException) as broken:
            custom.get_namespaced_custom_object(GROUP, VERSION, "ns4", PLURAL, "w4")
        assert broken.value.status == 500
        assert kube.get(RESOURCE, "ns4", "w4") is not None  # the harness's own requests bypass faults
        kube.clear_faults()
        assert custom.get_namespaced_custom_object(GROUP, VERSION, "ns4", PLURAL, "w4")["metadata"]["name"] == "w4"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_and_describe(kube: KubeEmulator, tmp_path: Path) -> None:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    kube.create(RESOURCE, "ns5", widget("w5"))
    kube.patch(
        RESOURCE, "ns5", "w5", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, subresource="status"
    )

    def kubectl(*args: str) -> str:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=hermetic_env(tmp_path / "home"),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    table = kubectl("get", "wdg", "-n", "ns5")
    assert re.search(r"NAME\s+READY\s+AGE", table) and re.search(r"w5\s+True", table)
    assert "Name:         w5" in kubectl("describe", "widgets", "w5", "-n", "ns5")


@pytest.mark.skipif(not REAL_CRD.exists(), reason="the project's CRD is not written yet")
def test_project_crd_loads(tmp_path: Path) -> None:
    with KubeEmulator() as kube:
        keys = kube.load_crd(REAL_CRD)
        assert keys == ["connectors.xpander.ai/v1alpha1/connectorcredentials"]
        created = kube.create(keys[0], "default", {"metadata": {"name": "c"}, "spec": {"secretArn": "arn:x"}})
        assert created["kind"] == "ConnectorCredential"


# -- AWS: moto through the IRSA chain, and the fault proxy -----------------------------------------

PROBE = textwrap.dedent("""
    import json, sys
    import boto3, botocore.config
    from botocore.exceptions import ClientError

    def attempt(name, secret_id):
        session = boto3.Session()  # fresh: credentials are fetched (AssumeRoleWithWebIdentity) anew
        config = botocore.config.Config(read_timeout=1, connect_timeout=1, retries={"total_max_attempts": 1})
        client = session.client("secretsmanager", config=config)
        try:
            value = client.get_secret_value(SecretId=secret_id)["SecretString"]
            row = {"ok": value, "method": session.get_credentials().method}
        except ClientError as exc:
            row = {"code": exc.response["Error"]["Code"], "operation": exc.operation_name,
                   "status": exc.response["ResponseMetadata"].get("HTTPStatusCode"),
                   "message": exc.response["Error"]["Message"]}
        except Exception as exc:
            row = {"exception": type(exc).__name__}
        finally:
            client.close()
        print(json.dumps({"name": name, **row}), flush=True)

    for name, secret_id in json.loads(sys.argv[1]):
        attempt(name, secret_id)
""")


def probe(env: dict[str, str], attempts: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(attempts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row.pop("name"): row for row in rows}


def test_irsa_chain_reaches_moto(aws: AwsEmulator, tmp_path: Path) -> None:
    arn = aws.create_secret("smoke/irsa", string="v1")
    version = aws.put_value(arn, string="v2")
    assert version
    env = hermetic_env(tmp_path / "home", **irsa_env(tmp_path, aws.endpoint))
    assert "AWS_ACCESS_KEY_ID" not in env
    rows = probe(env, [("plain", arn)])
    assert rows["plain"] == {"ok": "v2", "method": "assume-role-with-web-identity"}

    aws.schedule_deletion(arn)
    assert probe(env, [("deleted", arn)])["deleted"]["code"] == "InvalidRequestException"
    aws.restore(arn)


def test_fault_proxy_error_shapes(aws: AwsEmulator, tmp_path: Path) -> None:
    arns = {
        name: aws.create_secret(f"smoke/proxy-{name}", string=name)
        for name in ("ok", "denied", "kms", "decrypt", "throttled", "broken", "reset", "slow")
    }
    with FaultProxy(aws.endpoint) as proxy:
        env = hermetic_env(tmp_path / "home", **irsa_env(tmp_path, proxy.endpoint), AWS_MAX_ATTEMPTS="1")
        proxy.deny("proxy-denied")
        proxy.deny_kms("proxy-kms")
        proxy.decryption_failure("proxy-decrypt")
        proxy.throttle("GetSecretValue", "proxy-throttled")
        proxy.fail_5xx("GetSecretValue", "proxy-broken")
        proxy.reset_connection("GetSecretValue", "proxy-reset")
        proxy.latency(3, "GetSecretValue", "proxy-slow")
        rows = probe(env, list(arns.items()))

        assert rows["ok"] == {"ok": "ok", "method": "assume-role-with-web-identity"}
        expected = {
            "denied": ("AccessDeniedException", 400),
            "kms": ("AccessDeniedException", 400),
            "decrypt": ("DecryptionFailure", 400),
            "throttled": ("ThrottlingException", 400),
            "broken": ("InternalServiceError", 500),
        }
        for name, (code, status) in expected.items():
            assert rows[name]["code"] == code and rows[name]["status"] == status, rows[name]
            assert rows[name]["operation"] == "GetSecretValue"
        assert "smoke/proxy-denied" in rows["denied"]["message"]
        assert "KMS" in rows["kms"]["message"] and rows["throttled"]["message"] == "Rate exceeded"
        assert rows["reset"]["exception"] in {"ConnectionClosedError", "EndpointConnectionError"}, rows["reset"]
        assert rows["slow"]["exception"] == "ReadTimeoutError", rows["slow"]
        assert proxy.calls("GetSecretValue") == len(arns)
        assert proxy.calls("GetSecretValue", "proxy-denied") == 1

        proxy.clear()
        proxy.deny_assume_role(times=1)
        proxy.invalid_identity_token(times=1)
        proxy.expired_token(times=1)
        sts_rows = probe(
            env,
            [
                ("assume-denied", arns["ok"]),
                ("bad-token", arns["ok"]),
                ("expired", arns["ok"]),
                ("recovered", arns["ok"]),
            ],
        )
        for name, (code, status) in {
            "assume-denied": ("AccessDenied", 403),
            "bad-token": ("InvalidIdentityToken", 400),
            "expired": ("ExpiredTokenException", 400),
        }.items():
            row = sts_rows[name]
            assert (row["code"], row["status"], row["operation"]) == (code, status, "AssumeRoleWithWebIdentity"), row
        assert sts_rows["recovered"]["ok"] == "ok"
        assert proxy.calls("AssumeRoleWithWebIdentity") >= 4


# -- the runner ------------------------------------------------------------------------------------

STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    def bye(*_):
        print("stopping on SIGTERM", flush=True)
        sys.exit(0)
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, bye)
    print("started ns=" + os.environ.get("CCRED_SOCKET_PATH", "?"), flush=True)
    print("AWS_ACCESS_KEY_ID" in os.environ, "to stderr", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.05)
""")


def test_runner_captures_output_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "leaked-from-the-developer")
    log = tmp_path / "operator.log"
    proc = OperatorProcess(command=[sys.executable, "-c", STAND_IN], socket_path=tmp_path / "ccred.sock", log_path=log)
    with proc:
        line = proc.wait_for_log("started", timeout=10)
        assert line == f"started ns={tmp_path / 'ccred.sock'}"
        assert proc.wait_for_log(re.compile(r"(True|False) to stderr")) == "False to stderr"
        assert proc.running
    assert proc.returncode == 0
    assert "stopping on SIGTERM" in proc.output and "stopping on SIGTERM" in log.read_text()

    stubborn = OperatorProcess(
        command=[sys.executable, "-c", STAND_IN], extra_env={"IGNORE_TERM": "1"}, log_path=tmp_path / "stubborn.log"
    )
    stubborn.start()
    stubborn.wait_for_log("started")
    assert stubborn.stop(timeout=0.5) == -9  # SIGKILL after the grace period

    with pytest.raises(AssertionError, match=r"never true.*last value: 0"):
        wait_until(lambda: 0, timeout=0.1, message="never true")
    with pytest.raises(AssertionError, match="not in the output"):
        proc.wait_for_log("no such line", timeout=0.1)


def test_default_command_is_the_console_script(tmp_path: Path) -> None:
    try:
        proc = OperatorProcess(namespace="ns9", kubeconfig=tmp_path / "kc", log_path=tmp_path / "op.log")
    except FileNotFoundError:
        pytest.skip("the connector-credentials console script is not installed")
    assert proc.command[1:] == ["run", "--verbose", "-n", "ns9"]
    assert Path(proc.command[0]).name == "connector-credentials"
    assert proc.env["KUBECONFIG"] == str(tmp_path / "kc") and "AWS_ACCESS_KEY_ID" not in proc.env
