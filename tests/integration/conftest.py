"""Integration fixtures: the operator's console script against a real kube-apiserver + etcd
(``tests.support.controlplane``) and moto (AWS), each behind a fault-injecting proxy.

One control plane and one moto server per test session. Every test gets its own namespace with
the operator's ServiceAccount and the RBAC that ``deploy/`` ships; the operator authenticates
with a TokenRequest token of that ServiceAccount, never as the admin. Every test ends with a
leak check (no secret value it created may appear in any object, event or operator output)
and an RBAC check (the operator's log shows no 403).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector_credentials.client import CredentialClient
from tests.support.awsemu import AwsEmulator, irsa_env
from tests.support.awsproxy import FaultProxy
from tests.support.controlplane import ControlPlane
from tests.support.kube import Cluster
from tests.support.kubeproxy import KubeFaultProxy
from tests.support.runner import OperatorProcess, wait_until

ROOT = Path(__file__).parents[2]
CRD = ROOT / "crds" / "connectorcredentials.yaml"
RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
# What the API server or its clients print for a refused request: never expected from the operator.
FORBIDDEN = re.compile(r"\b403\b.*(Forbidden|forbidden)|is forbidden:|APIForbiddenError|Not enough permissions")


@pytest.fixture(scope="session")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as control_plane:
        yield control_plane


@pytest.fixture(scope="session")
def cluster(plane: ControlPlane) -> Cluster:
    admin = Cluster(plane)
    admin.apply_crds()
    return admin


@pytest.fixture(scope="session")
def kube(plane: ControlPlane, cluster: Cluster) -> Iterator[KubeFaultProxy]:
    with KubeFaultProxy(plane.url, plane.ssl_context()) as fault_proxy:
        yield fault_proxy


@pytest.fixture(scope="session")
def aws() -> Iterator[AwsEmulator]:
    with AwsEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def proxy(aws: AwsEmulator) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint) as fault_proxy:
        yield fault_proxy


class World:
    """One test's view: a namespace, its secrets, its resources, its operator processes."""

    def __init__(
        self, cluster: Cluster, kube: KubeFaultProxy, aws: AwsEmulator, proxy: FaultProxy, workdir: Path
    ) -> None:
        self.cluster, self.kube, self.aws, self.proxy, self.workdir = cluster, kube, aws, proxy, workdir
        self.namespace = f"t-{uuid.uuid4().hex[:10]}"
        self.prefix = f"xpander/{self.namespace}"
        self.canaries: list[str] = []
        self.operators: list[OperatorProcess] = []
        self.socket_path = str(workdir / "c.sock")
        cluster.create_namespace(self.namespace)
        cluster.install_operator_identity(self.namespace)
        self.token = cluster.service_account_token(self.namespace)

    # --- AWS side --------------------------------------------------------------------
    def canary(self, label: str = "value") -> str:
        value = f"CANARY-{label}-{uuid.uuid4().hex}"
        self.canaries.append(value)
        return value

    def secret(self, name: str, string: str | None = None, binary: bytes | None = None, **kwargs: Any) -> str:
        if string is None and binary is None:
            string = self.canary(name)
        if string is not None:
            self.canaries.append(string)
        return self.aws.create_secret(f"{self.prefix}/{name}", string=string, binary=binary, **kwargs)

    def irsa_env(self, endpoint: str | None = None) -> dict[str, str]:
        return irsa_env(self.workdir, endpoint or self.proxy.endpoint, role_arn=ROLE_ARN)

    # --- Kubernetes side ---------------------------------------------------------------
    def apply(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "connectors.xpander.ai/v1alpha1",
            "kind": "ConnectorCredential",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        return self.cluster.create(RESOURCE, self.namespace, body)

    def update_spec(self, name: str, spec: dict[str, Any]) -> None:
        current = self.get(name)
        assert current is not None
        patch = {"spec": {key: spec.get(key) for key in {*current["spec"], *spec}}}
        self.cluster.patch(RESOURCE, self.namespace, name, patch)

    def delete(self, name: str) -> None:
        self.cluster.delete(RESOURCE, self.namespace, name)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get(RESOURCE, self.namespace, name)

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get(name) or {}
        return obj.get("status") or {}

    def ready(self, name: str) -> dict[str, Any] | None:
        for condition in self.status(name).get("conditions") or []:
            if condition.get("type") == "Ready":
                return dict(condition)
        return None

    def wait_reason(self, name: str, reason: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            condition = self.ready(name)
            return condition if condition and condition.get("reason") == reason else None

        return wait_until(check, timeout=timeout, message=f"{name} never got reason {reason}: {self.ready(name)}")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The namespace's Events (of one object), oldest first.

        The API server lists them by name, and an Event's name ends in random hex: the order of
        a listing says nothing about time. ``eventTime`` (microseconds) does.
        """
        found = self.cluster.events(self.namespace)
        if name is not None:
            found = [e for e in found if (e.get("involvedObject") or {}).get("name") == name]
        return sorted(found, key=lambda e: str(e.get("eventTime") or e.get("lastTimestamp") or ""))

    # --- the operator --------------------------------------------------------------------
    def serve_text_blob_and_denied(self, blob_tail: bytes) -> tuple[str, bytes]:
        """Three credentials a reader in another language or process checks: a text secret, a
        binary one (a canary followed by ``blob_tail``) and one the IAM stand-in denies; then the
        operator, once the first and the last have their verdicts. Returns the two values."""
        os.chmod(self.workdir, 0o755)  # the reader may run as another user of this machine
        text = self.canary("text")
        blob = self.canary("blob").encode() + blob_tail
        self.apply("text", {"secretArn": self.secret("text", string=text)})
        self.apply("blob", {"secretArn": self.secret("blob", binary=blob)})
        self.apply("denied", {"secretArn": self.secret("denied")})
        self.proxy.deny(secret_id_contains=f"{self.prefix}/denied")
        self.start_operator()
        self.wait_reason("text", "AccessVerified")
        self.wait_reason("denied", "AccessDenied")
        return text, blob

    def start_operator(
        self,
        *,
        aws_env: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        socket_path: str | None = None,
        wait: bool = True,
        direct: bool = False,
    ) -> OperatorProcess:
        index = len(self.operators)
        # No drain at shutdown unless a test asks for one: every test stops its operators.
        extra_env = {"CCRED_SHUTDOWN_DRAIN": "0", **(extra_env or {})}
        process = OperatorProcess(
            namespace=self.namespace,
            kubeconfig=self.operator_kubeconfig(direct=direct),
            aws_env=self.irsa_env() if aws_env is None else aws_env,
            socket_path=socket_path or self.socket_path,
            extra_env=extra_env,
            extra_args=args,
            log_path=self.workdir / f"operator-{index}.log",
            home=self.workdir / f"home-{index}",
        )
        process.start()
        self.operators.append(process)
        if wait:
            process.wait_for_log("Serving credentials on", timeout=20)
        return process

    def operator_kubeconfig(self, *, direct: bool = False) -> Path:
        """The operator's kubeconfig: its ServiceAccount's token, through the fault proxy unless ``direct``."""
        name = "kubeconfig-direct" if direct else "kubeconfig"
        server = None if direct else self.kube.url
        return self.cluster.write_kubeconfig(
            self.workdir / name, token=self.token, namespace=self.namespace, server=server
        )

    def client(self, socket_path: str | None = None) -> CredentialClient:
        return CredentialClient(socket_path or self.socket_path, timeout=15)

    def everything_stored(self) -> str:
        """Every object (events included) the API server holds, as text."""
        return json.dumps(self.cluster.list_objects(), default=str)

    def assert_no_forbidden(self) -> None:
        """The shipped RBAC suffices: no request of the operator was refused."""
        for index, process in enumerate(self.operators):
            refused = [line for line in process.output.splitlines() if FORBIDDEN.search(line)]
            assert not refused, f"operator {index} was refused by the API server: {refused[:3]}"

    def assert_no_leaks(self) -> None:
        haystacks = {"api objects and events": self.everything_stored()}
        for index, process in enumerate(self.operators):
            haystacks[f"operator {index} output"] = process.output
        for canary in self.canaries:
            for where, text in haystacks.items():
                assert canary not in text, f"secret value leaked into {where}"


@pytest.fixture
def world(cluster: Cluster, kube: KubeFaultProxy, aws: AwsEmulator, proxy: FaultProxy) -> Iterator[World]:
    # Unix socket paths are limited to ~107 bytes: keep the work dir short.
    workdir = Path(tempfile.mkdtemp(prefix="ccred-", dir="/tmp"))
    the_world = World(cluster, kube, aws, proxy, workdir)
    try:
        yield the_world
        for process in the_world.operators:
            process.stop()
        the_world.assert_no_leaks()
        the_world.assert_no_forbidden()
    finally:
        for index, process in enumerate(the_world.operators):
            if process.running:
                process.stop()
            # Shown by pytest only when the test fails: what the operator said.
            print(f"--- operator {index} output (tail) ---\n{process.output[-6000:]}")
        proxy.clear()
        kube.clear_faults()
        shutil.rmtree(workdir, ignore_errors=True)
