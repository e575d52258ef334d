"""``make demo-cluster``: the demo's story in real pods, on the local single-node cluster.

Starts the cluster when none runs (``make cluster``), installs ``deploy/`` with ``kubectl apply -k``
(through the e2e overlay, which only points the sidecar at the local AWS stand-in), applies
``deploy/samples`` and shows what came of it: the pod with its native sidecar, the credentials'
readiness, a ``kubectl describe``, a read by the controller container through the socket (masked),
``doctor`` in the sidecar and the sidecar's ``/metrics``. ``--keep`` leaves it all running for a
look; otherwise the namespace is deleted and a cluster this demo started is stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tests.e2e.clusters import NAMESPACE, LocalNode
from tests.e2e.install import Install, apply_samples, wait_for
from tests.localnode import node

READ_MASKED = (
    "import sys; from connector_credentials.client import CredentialClient; "
    "c = CredentialClient().get(sys.argv[1], sys.argv[2]); "
    "print(f'{c.name}: {len(c.value)} characters, versionId {c.version_id}, value ***')"
)


def show(title: str, done: subprocess.CompletedProcess[str]) -> None:
    print(f"\n$ {title}\n{done.stdout.rstrip()}{done.stderr.rstrip()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make demo-cluster", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the cluster and the install running")
    args = parser.parse_args()
    try:
        node.preflight()
    except node.NodeError as exc:
        print(f"demo-cluster: {exc}", file=sys.stderr)
        return 3
    started = not node.running()
    if started:
        print("demo-cluster: starting the local cluster (make cluster) ...", flush=True)
        node.Node().up()
    cluster = LocalNode()
    install = Install("deploy", cluster)
    try:
        began = time.monotonic()
        show(
            "kubectl apply -k tests/e2e/overlays/deploy", cluster.kubectl("apply", "-k", str(cluster.overlay("deploy")))
        )
        apply_samples(install)
        install.kubectl("rollout", "status", "deploy/xpander-controller", "--timeout=180s", timeout=200)
        for name in ("slack", "jira", "github", "denied", "missing"):

            def checked(name: str = name) -> bool:
                return install.ready_condition(name) is not None

            wait_for(f"ccred/{name} to be checked", checked, timeout=120)
        print(f"\ndemo-cluster: installed and checked in {time.monotonic() - began:.0f} s", flush=True)
        show(
            "kubectl -n xpander get pods (the sidecar is a native sidecar: an init container that keeps running)",
            install.kubectl(
                "get", "pods", "-o",
                "custom-columns=POD:.metadata.name,READY:.status.conditions[?(@.type=='Ready')].status,"
                "SIDECAR:.spec.initContainers[0].name,RESTART-POLICY:.spec.initContainers[0].restartPolicy,"
                "CONTAINERS:.spec.containers[*].name",
            ),
        )  # fmt: skip
        show("kubectl -n xpander get ccred", install.kubectl("get", "ccred"))
        described = install.kubectl("describe", "ccred", "denied").stdout
        show(
            "kubectl -n xpander describe ccred denied   (its conditions)",
            subprocess.CompletedProcess([], 0, described[described.find("Conditions:") :], ""),
        )
        show(
            "kubectl exec deploy/xpander-controller -c controller -- python (the client library, value masked)",
            install.exec("controller", "python", "-c", READ_MASKED, NAMESPACE, "slack"),
        )
        show(
            "kubectl exec deploy/xpander-controller -c connector-credentials -- connector-credentials doctor",
            install.exec("connector-credentials", "connector-credentials", "doctor", "slack", "jira", check=False),
        )
        metrics = install.exec(
            "connector-credentials", "python", "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8081/metrics').read().decode())",
        ).stdout  # fmt: skip
        show(
            "curl http://<pod>:8081/metrics | grep ^ccred_credentials",
            subprocess.CompletedProcess(
                [], 0, "\n".join(m for m in metrics.splitlines() if m.startswith("ccred_credentials{")), ""
            ),
        )
    finally:
        if args.keep:
            print(f"\ndemo-cluster: left running. In your shell:\n{node.exports()}make cluster-down   # when done")
        else:
            cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
            if started:
                node.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
