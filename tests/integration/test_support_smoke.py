"""Smoke tests of the test harness itself: the control plane, moto, both fault proxies, the runner."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.support.awsemu import AwsEmulator, irsa_env
from tests.support.awsproxy import ACCESS_DENIED_MESSAGE, DECRYPTION_FAILURE_MESSAGE, KMS_DENIED_MESSAGE, FaultProxy
from tests.support.controlplane import ControlPlane
from tests.support.kube import Cluster
from tests.support.kubeproxy import KubeFaultProxy
from tests.support.runner import OperatorProcess, hermetic_env, wait_until

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_secretsmanager.type_defs import FilterTypeDef

RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsEmulator]:
    with AwsEmulator() as emulator:
        yield emulator


# -- The control plane and the Kubernetes fault proxy ------------------------------------------------


def test_control_plane_is_ready_quickly_and_enforces_rbac(
    plane: ControlPlane, cluster: Cluster, tmp_path: Path
) -> None:
    assert plane.started_in < 30, f"the control plane took {plane.started_in:.1f}s to become ready"
    namespace = f"smoke-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(namespace)
    cluster.install_operator_identity(namespace)
    kubeconfig = cluster.write_kubeconfig(
        tmp_path / "kc", token=cluster.service_account_token(namespace), namespace=namespace
    )
    with config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        custom = client.CustomObjectsApi(api_client)
        assert (
            custom.list_namespaced_custom_object(
                "connectors.xpander.ai", "v1alpha1", namespace, "connectorcredentials"
            )["items"]
            == []
        )
        with pytest.raises(ApiException) as secrets:
            client.CoreV1Api(api_client).list_namespaced_secret(namespace)
        assert secrets.value.status == 403
        with pytest.raises(ApiException) as elsewhere:
            custom.list_namespaced_custom_object("connectors.xpander.ai", "v1alpha1", "default", "connectorcredentials")
        assert elsewhere.value.status == 403


def test_processes_are_stopped(tmp_path: Path) -> None:
    with ControlPlane(workdir=tmp_path / "cp") as second:
        pids = [proc.pid for proc in second._procs]
        assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_kube_fault_proxy_injects_and_drops(cluster: Cluster, kube: KubeFaultProxy, tmp_path: Path) -> None:
    namespace = f"smoke-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(namespace)
    cluster.install_operator_identity(namespace)
    token = cluster.service_account_token(namespace)
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kc", token=token, namespace=namespace, server=kube.url)
    body = {
        "apiVersion": "connectors.xpander.ai/v1alpha1",
        "kind": "ConnectorCredential",
        "metadata": {"name": "w"},
        "spec": {"secretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:a-AbCdEf"},
    }
    cluster.create(RESOURCE, namespace, body)
    with config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        custom = client.CustomObjectsApi(api_client)
        args = ("connectors.xpander.ai", "v1alpha1", namespace, "connectorcredentials", "w")
        kube.fail_status_patches(times=1, status=409)
        with pytest.raises(ApiException) as conflict:
            custom.patch_namespaced_custom_object_status(*args, {"status": {"checkedGeneration": 1}})
        assert conflict.value.status == 409
        custom.patch_namespaced_custom_object_status(*args, {"status": {}})  # the fault was used up
        assert len(kube.requests("PATCH", r"/w/status$")) == 2
        assert custom.get_namespaced_custom_object(*args)["metadata"]["name"] == "w"

        stream = watch.Watch().stream(custom.list_namespaced_custom_object, *args[:4], timeout_seconds=30)
        first = next(stream)
        assert first["type"] == "ADDED"
        wait_until(lambda: kube.active_watches >= 1, timeout=5, message="the watch is not seen by the proxy")
        assert kube.drop_watches() >= 1
        with contextlib.suppress(Exception):
            for _ in stream:
                pass  # ends when the proxy drops the stream
        wait_until(lambda: kube.active_watches == 0, timeout=5, message="the watch was not dropped")


def test_kubectl_works_against_the_control_plane(cluster: Cluster) -> None:
    assert "namespaces" in cluster.kubectl("api-resources", "-o", "name").stdout
    explained = cluster.kubectl("explain", "connectorcredential.spec.secretArn").stdout
    assert "secretArn" in explained


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


# -- the AWS fault proxy and BatchGetSecretValue ---------------------------------------------------


class Batch:
    """A fault proxy in front of a second, rule-less one in front of moto (``behind`` sees what
    reached moto), a static-key client through both, and uniquely named secrets."""

    def __init__(self, aws: AwsEmulator, proxy: FaultProxy, behind: FaultProxy) -> None:
        self.aws, self.proxy, self.behind = aws, proxy, behind
        self.prefix = f"smoke/batch-{uuid.uuid4().hex[:8]}"
        config = botocore.config.Config(retries={"total_max_attempts": 1}, proxies={})
        self.client: SecretsManagerClient = boto3.session.Session().client(
            "secretsmanager",
            region_name="us-east-1",
            endpoint_url=proxy.endpoint,
            config=config,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def secrets(self, *names: str) -> list[str]:
        return [self.aws.create_secret(f"{self.prefix}/{name}", string=f"value-{name}") for name in names]

    def read(self, arns: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """One batch: the values by ARN, the errors by secret id."""
        response = self.client.batch_get_secret_value(SecretIdList=arns)
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert response["ResponseMetadata"]["RequestId"]
        values = {entry["ARN"]: entry["SecretString"] for entry in response["SecretValues"]}
        errors = {
            entry["SecretId"]: {"code": entry["ErrorCode"], "message": entry["Message"]} for entry in response["Errors"]
        }
        return values, errors


@pytest.fixture
def batch(aws: AwsEmulator) -> Iterator[Batch]:
    with FaultProxy(aws.endpoint) as behind, FaultProxy(behind.endpoint) as proxy:
        harness = Batch(aws, proxy, behind)
        with contextlib.closing(harness.client):
            yield harness


def test_batch_answers_a_denied_secret_in_errors_and_forwards_the_rest(batch: Batch) -> None:
    ok, denied, also_ok, throttled = batch.secrets("ok", "denied", "also-ok", "throttled")
    batch.proxy.deny(f"{batch.prefix}/denied")
    values, errors = batch.read([ok, denied, also_ok])

    assert values == {ok: "value-ok", also_ok: "value-also-ok"}
    assert errors == {
        denied: {
            "code": "AccessDeniedException",
            "message": ACCESS_DENIED_MESSAGE.format(action="GetSecretValue", secret_id=denied),
        }
    }
    assert [seen.secret_ids for seen in batch.behind.seen] == [(ok, also_ok)]  # the rewritten body was accepted
    assert batch.proxy.seen[-1].answered == (denied,) and batch.proxy.seen[-1].outcome == "forwarded"
    with pytest.raises(ClientError) as single:  # the same rule, a read alone
        batch.client.get_secret_value(SecretId=denied)
    assert single.value.response["Error"]["Code"] == "AccessDeniedException"

    # moto's own errors are kept, the injected ones follow; a throttle naming a secret is per secret.
    batch.proxy.throttle(secret_id_contains=f"{batch.prefix}/throttled")
    missing = f"{batch.prefix}/missing"
    values, errors = batch.read([missing, throttled, ok, denied])
    assert values == {ok: "value-ok"}
    assert {sid: error["code"] for sid, error in errors.items()} == {
        missing: "ResourceNotFoundException",
        throttled: "ThrottlingException",
        denied: "AccessDeniedException",
    }
    assert list(errors) == [missing, throttled, denied]
    assert batch.behind.seen[-1].secret_ids == (missing, ok)


def test_batch_whose_every_id_is_answered_is_not_forwarded(batch: Batch) -> None:
    kms, decrypt, not_found = batch.secrets("kms", "decrypt", "gone")
    batch.proxy.deny_kms(f"{batch.prefix}/kms")
    batch.proxy.decryption_failure(f"{batch.prefix}/decrypt")
    batch.proxy.add_rule("GetSecretValue", f"{batch.prefix}/gone", error_code="ResourceNotFoundException")
    values, errors = batch.read([kms, decrypt, not_found])

    assert values == {}
    assert errors[kms] == {"code": "AccessDeniedException", "message": KMS_DENIED_MESSAGE}
    assert errors[decrypt] == {"code": "DecryptionFailure", "message": DECRYPTION_FAILURE_MESSAGE}
    assert errors[not_found]["code"] == "ResourceNotFoundException"
    assert batch.behind.seen == []  # moto saw nothing
    assert batch.proxy.seen[-1].outcome == "answered"
    assert batch.proxy.seen[-1].answered == (kms, decrypt, not_found)


def test_batch_action_denied_and_request_level_rules(batch: Batch) -> None:
    (arn,) = batch.secrets("plain")
    rule = batch.proxy.deny(action="BatchGetSecretValue")
    with pytest.raises(ClientError) as denied:
        batch.client.batch_get_secret_value(SecretIdList=[arn])
    error = denied.value.response["Error"]
    assert (error["Code"], denied.value.operation_name) == ("AccessDeniedException", "BatchGetSecretValue")
    assert error["Message"] == ACCESS_DENIED_MESSAGE.format(action="BatchGetSecretValue", secret_id="*")
    assert batch.client.get_secret_value(SecretId=arn)["SecretString"] == "value-plain"  # the rule is batch-only
    assert rule.hits == 1 and batch.behind.calls("BatchGetSecretValue") == 0

    batch.proxy.clear()
    batch.proxy.throttle()  # no secret: the whole batch
    with pytest.raises(ClientError) as throttled:
        batch.client.batch_get_secret_value(SecretIdList=[arn])
    assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
    assert throttled.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert batch.proxy.seen[-1].outcome == "error:ThrottlingException"

    batch.proxy.clear()
    batch.proxy.latency(0.3, "BatchGetSecretValue", f"{batch.prefix}/plain")  # a secret, yet the whole request
    started = time.monotonic()
    assert batch.read([arn]) == ({arn: "value-plain"}, {})
    assert time.monotonic() - started >= 0.3
    assert batch.behind.calls("BatchGetSecretValue") == 1


def post_json(endpoint: str, action: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    """A JSON 1.1 request with a made-up signature (moto routes by its scope, checks nothing): raw reply."""
    scope = "Credential=testing/20250101/us-east-1/secretsmanager/aws4_request"
    headers = {
        "X-Amz-Target": f"secretsmanager.{action}",
        "Content-Type": "application/x-amz-json-1.1",
        "Authorization": f"AWS4-HMAC-SHA256 {scope}, SignedHeaders=host;x-amz-target, Signature=0",
    }
    request = urllib.request.Request(f"{endpoint}/", data=json.dumps(payload).encode(), method="POST", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_batch_upstream_errors_pass_through(batch: Batch) -> None:
    ok, denied = batch.secrets("ok", "denied")
    batch.proxy.deny(f"{batch.prefix}/denied")
    # moto refuses SecretIdList with Filters (400): its answer to the reduced batch comes back as is.
    filters: list[FilterTypeDef] = [{"Key": "name", "Values": [batch.prefix]}]
    with pytest.raises(ClientError) as refused:
        batch.client.batch_get_secret_value(SecretIdList=[ok, denied], Filters=filters)
    assert refused.value.response["Error"]["Code"] == "InvalidParameterException"
    assert batch.behind.seen[-1].secret_ids == (ok,)

    through = post_json(batch.proxy.endpoint, "BatchGetSecretValue", {"SecretIdList": [ok, denied], "Filters": filters})
    direct = post_json(batch.aws.endpoint, "BatchGetSecretValue", {"SecretIdList": [ok], "Filters": filters})
    assert through == direct and direct[0] == 400, (through, direct)


def test_reads_and_batch_sizes(batch: Batch) -> None:
    a, b, c = batch.secrets("a", "b", "c")
    batch.client.get_secret_value(SecretId=a)
    batch.read([a, b, c])
    batch.read([b])
    batch.proxy.deny(f"{batch.prefix}/c")
    batch.read([c])  # answered by the proxy: still a read
    batch.client.describe_secret(SecretId=a)

    assert batch.proxy.reads() == 4
    assert batch.proxy.reads(f"{batch.prefix}/a") == 2  # once per request, not per id
    assert batch.proxy.reads(f"{batch.prefix}/") == 4
    assert batch.proxy.reads(f"{batch.prefix}/b") == 2
    assert batch.proxy.reads(f"{batch.prefix}/c") == 2
    assert batch.proxy.batch_sizes() == [3, 1, 1]
    assert batch.proxy.calls("GetSecretValue") == 1 and batch.proxy.calls("BatchGetSecretValue") == 3


def test_batch_rule_hits_count_ids(batch: Batch) -> None:
    one, two, three = batch.secrets("t-1", "t-2", "t-3")
    once = batch.proxy.deny(f"{batch.prefix}/t-", times=1)
    values, errors = batch.read([one, two, three])
    assert list(errors) == [one] and set(values) == {two, three}
    assert once.hits == 1 and not once.active
    assert batch.read([one, two, three])[1] == {}

    twice = batch.proxy.deny(f"{batch.prefix}/t-", times=2)
    values, errors = batch.read([one, two, three])
    assert list(errors) == [one, two] and set(values) == {three}  # two ids in one request: both hits
    assert twice.hits == 2
    assert batch.client.get_secret_value(SecretId=one)["SecretString"] == "value-t-1"  # used up for single reads


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
