"""The clusters the e2e suite runs on, behind one small interface.

* :class:`LocalNode` (the default, what CI runs): the single-node cluster of ``tests/localnode``
  on this machine. The tests reach it as a user would (kubectl with its kubeconfig), plus the
  node's own files where a test must look below Kubernetes: etcd's data files, the daemons'
  logs, and containerd (to kill a container's process as a crash would).
* :class:`Kind` (``E2E_CLUSTER=kind``, for machines with Docker): a kind cluster, the images built
  with Docker. What needs the node's files is skipped there, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.localnode import host as localnode_host
from tests.localnode import node as localnode

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "tests" / "e2e" / "overlays"
NAMESPACE = "xpander"
#: The image reference deploy/ renders (deploy/kustomization.yaml `images:`): the local node
#: loads the image under exactly this name, so the shipped manifests run unchanged.
OPERATOR_IMAGE = "registry.example.com/xpander/connector-credential-operator:0.1.0"


class Cluster:
    name = "cluster"
    kubeconfig: Path
    #: Whether EKS's own pod identity webhook runs in the cluster (else an overlay stands in for it).
    irsa_webhook = True

    def overlay(self, install: str) -> Path:
        """The kustomization that installs ``install`` (deploy, existing-controller) here."""
        return OVERLAYS / install

    def seeded_arns(self) -> dict[str, str]:
        """The ARNs of the secrets the AWS stand-in seeded, by secret name."""
        raise NotImplementedError

    def aws_client(self) -> Any:
        """A Secrets Manager client of this test process on the AWS stand-in."""
        pytest.skip(f"the AWS stand-in is not reachable from the tests on {self.name}")

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            cwd=REPO,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"`kubectl {' '.join(args)}` exited {done.returncode}\n--- stdout\n{done.stdout}\n"
                f"--- stderr\n{done.stderr}",
                pytrace=False,
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def kill_container(self, container_id: str) -> None:
        """SIGKILL a container's main process, as an out-of-memory kill or a crash would."""
        raise NotImplementedError

    def etcd_files(self) -> list[Path]:
        pytest.skip(f"etcd's data files are not reachable on {self.name}")

    def containerd_events(self) -> list[str]:
        """The command that streams containerd's events on the node."""
        pytest.skip(f"containerd's events are not reachable on {self.name}")

    @contextlib.contextmanager
    def container_exits(self) -> Iterator[dict[str, tuple[str, int]]]:
        """Collects, while the block runs, the exits of containers' main processes as containerd
        reports them: container id -> (exit time with nanoseconds, exit status)."""
        exits: dict[str, tuple[str, int]] = {}
        stream = subprocess.Popen(self.containerd_events(), stdout=subprocess.PIPE, text=True)
        try:
            yield exits
        finally:
            stream.terminate()
            out, _ = stream.communicate(timeout=10)
        for line in out.splitlines():
            if " /tasks/exit " in line:
                event = json.loads(line.split(" /tasks/exit ", 1)[1])
                if event.get("id") == event["container_id"]:  # the main process, not an exec
                    exits[event["container_id"]] = (event["exited_at"], int(event.get("exit_status", 0)))

    def node_logs(self) -> str:
        return ""


class LocalNode(Cluster):
    name = "the local node"

    def __init__(self) -> None:
        if not localnode.running():
            pytest.fail("the local cluster is not running: `make e2e` starts it (or `make cluster`)", pytrace=False)
        self.kubeconfig = localnode.STATE / "admin.kubeconfig"

    def kill_container(self, container_id: str) -> None:
        subprocess.run(
            [
                "ctr", "--address", str(localnode.STATE / "containerd.sock"), "-n", "k8s.io",
                "tasks", "kill", "--signal", "SIGKILL", container_id.removeprefix("containerd://"),
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip

    def seeded_arns(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{localnode.AWS_URL}/_e2e/seeded", timeout=10) as answer:
            return dict(json.loads(answer.read())["arns"])

    def aws_client(self) -> Any:
        import boto3

        return boto3.client(
            "secretsmanager",
            endpoint_url=localnode.AWS_URL,
            region_name="us-east-1",
            aws_access_key_id="e2e",
            aws_secret_access_key="e2e",
        )

    def containerd_events(self) -> list[str]:
        return ["ctr", "--address", str(localnode.STATE / "containerd.sock"), "-n", "k8s.io", "events"]

    def etcd_files(self) -> list[Path]:
        return [path for path in (localnode.STATE / "etcd").rglob("*") if path.is_file()]

    def node_logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted((localnode.STATE / "logs").glob("*.log")))

    @staticmethod
    def in_node(*command: str) -> list[str]:
        return localnode_host.in_netns(*command)


class Kind(Cluster):
    """A kind cluster named ``E2E_KIND_CLUSTER`` (default ccred-e2e), created if missing, for
    machines with Docker. The AWS stand-in runs as a pod (tests/e2e/moto.Dockerfile) and an overlay
    stands in for EKS's IRSA webhook (tests/e2e/overlays/kind). Not run in CI."""

    name = "kind"
    irsa_webhook = False

    def __init__(self, tmp: Path) -> None:
        self.cluster = os.environ.get("E2E_KIND_CLUSTER", "ccred-e2e")
        self.kubeconfig = tmp / "kubeconfig"
        clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, check=True).stdout
        if self.cluster not in clusters.split():
            subprocess.run(["kind", "create", "cluster", "--name", self.cluster, "--wait", "180s"], check=True)
        subprocess.run(
            ["kind", "export", "kubeconfig", "--name", self.cluster, "--kubeconfig", str(self.kubeconfig)], check=True
        )
        for image, dockerfile in ((OPERATOR_IMAGE, "Dockerfile"), ("ccred-fake-aws:e2e", "tests/e2e/moto.Dockerfile")):
            subprocess.run(["docker", "build", "-t", image, "-f", dockerfile, str(REPO)], check=True)
            subprocess.run(["kind", "load", "docker-image", image, "--name", self.cluster], check=True)
        self.kubectl("apply", "-k", str(OVERLAYS / "kind" / "aws"))
        self.kubectl("-n", "ccred-aws", "rollout", "status", "deploy/moto", "--timeout=300s", timeout=330)

    def overlay(self, install: str) -> Path:
        overlay = OVERLAYS / "kind" / install
        if not overlay.exists():
            pytest.skip(f"no kind overlay for {install}")
        return overlay

    def seeded_arns(self) -> dict[str, str]:
        proxy = "/api/v1/namespaces/ccred-aws/services/http:moto:5000/proxy/_e2e/seeded"
        return dict(json.loads(self.kubectl("get", "--raw", proxy).stdout)["arns"])

    def containerd_events(self) -> list[str]:
        return ["docker", "exec", f"{self.cluster}-control-plane", "ctr", "-n", "k8s.io", "events"]

    def kill_container(self, container_id: str) -> None:
        subprocess.run(
            [
                "docker", "exec", f"{self.cluster}-control-plane", "ctr", "-n", "k8s.io", "tasks", "kill",
                "--signal", "SIGKILL", container_id.removeprefix("containerd://"),
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
