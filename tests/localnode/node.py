"""A real single-node Kubernetes cluster on this machine: no Docker, no registry, no cloud.

``up`` starts, all inside the network namespace of :mod:`tests.localnode.host`:

etcd, kube-apiserver (Node,RBAC authorization, NodeRestriction), kube-controller-manager,
kube-scheduler, kube-proxy (iptables: the ``kubernetes`` service VIP works in pods as on EKS),
containerd with the CRI plugin, runc and the CNI bridge, the kubelet (node ``ccred-localnode``),
EKS's own IRSA mutating webhook (``amazon-eks-pod-identity-webhook``, registered with a
MutatingWebhookConfiguration as EKS registers it), and the AWS stand-in (moto behind the IAM
gate of ``tests/e2e/fake_aws.py``) on the node's address, which pods and this host both reach.

The binaries come from pinned Go modules (``tests/controlplane/build.sh --node``), the images
from ``tests/localnode/images.sh`` (the project's Dockerfile on a Debian base built here), loaded
into containerd under the names the manifests use. ``down`` undoes everything (see ``host``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.localnode import configs, host
from tests.support.controlplane import _Pki, kubeconfig

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("CCRED_LOCALNODE_DIR", "/tmp/ccred-localnode"))
STATE_FILE = STATE / "state.json"
API_URL = f"https://{host.NODE_IP}:6443"
AWS_URL = f"http://{host.NODE_IP}:5000"
WEBHOOK_PORT = 8443
REQUIRED_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "ip", "iptables", "podman")


class NodeError(RuntimeError):
    """The cluster cannot start here; the message says why and what to do."""


def exports() -> str:
    return f"export KUBECONFIG={STATE / 'admin.kubeconfig'}\nexport AWS_ENDPOINT_URL={AWS_URL}\n"


def preflight() -> None:
    """Why this machine cannot run the cluster, as one clear error (root, tools, cgroups)."""
    if os.geteuid() != 0:
        raise NodeError(
            "the local cluster needs root (network namespace, cgroups, mounts, containerd): "
            "run `sudo make cluster`, or use an existing cluster with KUBECONFIG=..."
        )
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("/usr/lib/cni/bridge")
    if missing:
        raise NodeError(
            f"missing: {', '.join(missing)}. Install the Debian packages: apt-get install containerd runc "
            "containernetworking-plugins podman debootstrap iptables conntrack util-linux"
        )
    names = {path.name for path in host.hierarchies(("cgroup",))}
    if not {"pids", "memory", "cpu", "cpuset"} <= {n for name in names for n in name.split(",")}:
        raise NodeError(
            f"cgroup v1 hierarchies pids, memory, cpu and cpuset are needed under /sys/fs/cgroup (found: "
            f"{', '.join(sorted(names)) or 'none'})"
        )


def running() -> bool:
    """Whether a cluster runs: its processes are alive. What a killed one left behind (its
    namespace, mounts, cgroups) is not a running cluster: ``up`` and ``down`` clear it."""
    return bool(host.cgroup_processes())


def build_binaries() -> Path:
    done = subprocess.run(
        ["bash", str(ROOT / "tests/controlplane/build.sh"), "--node"], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise NodeError(f"tests/controlplane/build.sh --node failed with exit code {done.returncode} (see above)")
    return Path(done.stdout.strip().splitlines()[-1])


def build_images() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "tests/localnode/images.sh"), "build"], stdout=subprocess.DEVNULL, check=False
    )
    if done.returncode != 0:
        raise NodeError(f"tests/localnode/images.sh build failed with exit code {done.returncode} (see above)")


class Node:
    def __init__(self) -> None:
        self.logs = STATE / "logs"
        self.pki_dir = STATE / "pki"
        self.pids: dict[str, int] = {}

    # --- start -------------------------------------------------------------------------------

    def up(self, python: str = sys.executable) -> None:
        began = time.monotonic()
        preflight()
        if running():
            raise NodeError(f"a local cluster is already running (nothing changed):\n{exports()}")
        if STATE.exists() or leftovers():
            down(quiet=True)  # what a killed run left behind
        bin_dir = build_binaries()
        build_images()
        built = time.monotonic()
        STATE.mkdir(parents=True)
        self.logs.mkdir()
        state: dict[str, Any] = {
            "created_paths": [str(path) for path in host.FIXED_PATHS if not path.exists()],
            "sysctls": host.read_sysctls(),
        }
        STATE_FILE.write_text(json.dumps(state))
        try:
            host.create_network()
            host.create_cgroups()
            self._pki()
            self._start_control_plane(bin_dir)
            self._start_node(bin_dir)
            self._start_irsa_webhook(bin_dir)
            self._start_aws(python)
            self._wait("the node to be Ready", self._node_ready, timeout=120)
        except BaseException:
            for name in self.pids:
                tail = self.log_tail(name, 1500)
                if tail:
                    print(f"--- {name} (last lines of {self.logs / name}.log)\n{tail}", file=sys.stderr)
            if os.environ.get("CCRED_LOCALNODE_KEEP_ON_FAILURE") == "1":
                print(f"localnode: kept for a look ({STATE}); `make cluster-down` removes it", file=sys.stderr)
            else:
                down(quiet=True)
            raise
        state["pids"] = self.pids
        state["started_in"] = round(time.monotonic() - built, 1)
        state["setup_seconds"] = round(time.monotonic() - began, 1)
        STATE_FILE.write_text(json.dumps(state))
        print(f"localnode: up in {state['setup_seconds']} s ({state['started_in']} s after the build)", file=sys.stderr)

    def _pki(self) -> None:
        self.pki_dir.mkdir()
        pki = self.pki = _Pki(self.pki_dir)
        self.ca = pki.ca_file
        names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
        self.apiserver_cert = pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            addresses=(host.NODE_IP, host.KUBERNETES_SERVICE_IP, "127.0.0.1", "localhost", *names),
        )
        self.kubelet_serving = pki.issue(
            "kubelet-serving", configs.NODE_NAME, server=True, addresses=(host.NODE_IP, configs.NODE_NAME)
        )
        self.webhook_cert = pki.issue(
            "webhook", "pod-identity-webhook", server=True, addresses=("127.0.0.1", host.NODE_IP)
        )
        self.apiserver_kubelet_client = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver", groups=("system:masters",)
        )
        self.sa_public, self.sa_private = pki.signing_key()
        users = {
            "admin": ("ccred-admin", ("system:masters",)),
            "controller-manager": ("system:kube-controller-manager", ()),
            "scheduler": ("system:kube-scheduler", ()),
            "kube-proxy": ("system:kube-proxy", ()),
            "kubelet": (f"system:node:{configs.NODE_NAME}", ("system:nodes",)),
        }
        for user, (common_name, groups) in users.items():
            cert, key = pki.issue(user, common_name, groups=groups)
            (STATE / f"{user}.kubeconfig").write_text(
                kubeconfig(
                    server=API_URL,
                    ca_file=self.ca,
                    user={"client-certificate": str(cert), "client-key": str(key)},
                    name=user,
                )
            )

    def _spawn(self, name: str, *command: str, env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                host.in_netns(*command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # outlives `make cluster`
                preexec_fn=host.join_daemons_cgroup,  # noqa: PLW1509 - no threads in the child before exec
            )
        self.pids[name] = proc.pid

    def _start_control_plane(self, bin_dir: Path) -> None:
        self._spawn(
            "etcd",
            str(bin_dir / "etcd"),
            "--name=ccred-localnode",
            f"--data-dir={STATE / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=ccred-localnode=http://127.0.0.1:2380",
            "--unsafe-no-fsync",
            "--log-level=warn",
        )
        self._spawn(
            "kube-apiserver",
            str(bin_dir / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0",  # inside the node's namespace: the node address and loopback
            f"--advertise-address={host.NODE_IP}",
            "--secure-port=6443",
            f"--cert-dir={STATE / 'apiserver-certs'}",
            f"--tls-cert-file={self.apiserver_cert[0]}",
            f"--tls-private-key-file={self.apiserver_cert[1]}",
            f"--client-ca-file={self.ca}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_public}",
            f"--service-account-signing-key-file={self.sa_private}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={host.SERVICE_CIDR}",
            f"--kubelet-client-certificate={self.apiserver_kubelet_client[0]}",
            f"--kubelet-client-key={self.apiserver_kubelet_client[1]}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false",
            "--v=1",
        )
        self._wait("kube-apiserver to be ready", lambda: self._api_get("/readyz") is not None, timeout=90)
        self._spawn(
            "kube-controller-manager",
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={STATE / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={STATE / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={STATE / 'controller-manager.kubeconfig'}",
            f"--service-account-private-key-file={self.sa_private}",
            f"--root-ca-file={self.ca}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10257",
            f"--cert-dir={STATE / 'controller-manager-certs'}",
            "--v=1",
        )
        self._spawn(
            "kube-scheduler",
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={STATE / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={STATE / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={STATE / 'scheduler.kubeconfig'}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            f"--cert-dir={STATE / 'scheduler-certs'}",
            "--v=1",
        )

    def _start_node(self, bin_dir: Path) -> None:
        (STATE / "cni" / "net.d").mkdir(parents=True)
        (STATE / "cni" / "net.d" / "10-ccred-localnode.conflist").write_text(configs.cni(STATE))
        (STATE / "containerd.toml").write_text(configs.containerd(STATE))
        self._spawn("containerd", "containerd", f"--config={STATE / 'containerd.toml'}")
        socket = STATE / "containerd.sock"
        self._wait(
            "containerd to answer",
            lambda: (
                subprocess.run(
                    ["ctr", "--address", str(socket), "version"], capture_output=True, check=False
                ).returncode
                == 0
            ),
            timeout=30,
        )
        done = subprocess.run(["bash", str(ROOT / "tests/localnode/images.sh"), "load", str(socket)], check=False)
        if done.returncode != 0:
            raise NodeError("loading the images into containerd failed (see above)")
        (STATE / "kube-proxy.yaml").write_text(
            configs.kube_proxy(kubeconfig=STATE / "kube-proxy.kubeconfig", metrics_port=10249, healthz_port=10256)
        )
        self._spawn("kube-proxy", str(bin_dir / "kube-proxy"), f"--config={STATE / 'kube-proxy.yaml'}", "--v=1")
        (STATE / "kubelet.yaml").write_text(
            configs.kubelet(STATE, ca=self.ca, serving=self.kubelet_serving, healthz_port=10248)
        )
        self._spawn(
            "kubelet",
            str(bin_dir / "kubelet"),
            f"--config={STATE / 'kubelet.yaml'}",
            f"--kubeconfig={STATE / 'kubelet.kubeconfig'}",
            f"--root-dir={STATE / 'kubelet'}",
            f"--cert-dir={STATE / 'kubelet-certs'}",
            f"--hostname-override={configs.NODE_NAME}",
            f"--node-ip={host.NODE_IP}",
            "--v=1",
        )

    def _start_irsa_webhook(self, bin_dir: Path) -> None:
        self._spawn(
            "irsa-webhook",
            str(bin_dir / "amazon-eks-pod-identity-webhook"),
            "--in-cluster=false",
            f"--kubeconfig={STATE / 'admin.kubeconfig'}",
            f"--tls-cert={self.webhook_cert[0]}",
            f"--tls-key={self.webhook_cert[1]}",
            f"--port={WEBHOOK_PORT}",
            "--metrics-port=9999",
            "--annotation-prefix=eks.amazonaws.com",
            "--token-audience=sts.amazonaws.com",
            "--aws-default-region=us-east-1",
            "--sts-regional-endpoint=true",
            # A ServiceAccount applied together with its Deployment may reach the webhook's cache
            # a moment after the first pod: wait for it rather than leave the pod without IRSA.
            "--service-account-lookup-grace-period=5s",
            "--logtostderr",
        )
        context = ssl.create_default_context(cafile=str(self.ca))
        self._wait(
            "the IRSA webhook to serve",
            lambda: _http_ok(f"https://{host.NODE_IP}:{WEBHOOK_PORT}/healthz", context),
            timeout=30,
        )
        registration = configs.irsa_webhook_configuration(
            port=WEBHOOK_PORT, ca_bundle=base64.b64encode(self.ca.read_bytes()).decode()
        )
        subprocess.run(
            ["kubectl", "--kubeconfig", str(STATE / "admin.kubeconfig"), "apply", "-f", "-"],
            input=json.dumps(registration),
            text=True,
            check=True,
            capture_output=True,
        )

    def _start_aws(self, python: str) -> None:
        self._spawn(
            "aws",
            python,
            "-m",
            "tests.e2e.fake_aws",
            "--host=0.0.0.0",
            "--port=5000",
            f"--iam-dir={ROOT / 'deploy' / 'iam'}",
            env={"PYTHONUNBUFFERED": "1"},
        )
        self._wait("the AWS stand-in to be seeded", lambda: _http_ok(f"{AWS_URL}/_e2e/seeded"), timeout=60)

    # --- checks ------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return context

    def _api_get(self, path: str) -> Any:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{API_URL}{path}", context=self._context(), timeout=3) as answer:
                body = answer.read()
                return json.loads(body) if body.startswith(b"{") else body
        return None

    def _node_ready(self) -> bool:
        node = self._api_get(f"/api/v1/nodes/{configs.NODE_NAME}")
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _wait(self, what: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise NodeError(f"{name} exited while waiting for {what}: see {self.logs / name}.log")
            if probe():
                return
            time.sleep(0.25)
        raise NodeError(f"timed out after {timeout:g} s waiting for {what}")

    def log_tail(self, name: str, size: int) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{name}.log").read_text(errors="replace")[-size:]
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(url, context=context, timeout=3) as answer:
            return bool(answer.status == 200)
    return False


# --- stop ------------------------------------------------------------------------------------


def down(*, quiet: bool = False) -> list[str]:
    """Stop everything and undo every change; return what could not be undone (empty: clean)."""
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(STATE_FILE.read_text())
    peak, resident = host.peak_memory_bytes(), host.resident_memory_bytes()
    host.kill_cgroup_processes()
    left = [f"process {pid}" for pid in host.cgroup_processes()]
    # The namespace first: `ip netns` may mount /run/netns again while it deletes one.
    host.delete_network()
    left += [f"mount {point}" for point in host.unmount_under(STATE, *map(Path, state.get("created_paths", ())))]
    left += [f"cgroup {group}" for group in host.delete_cgroups()]
    restored = host.restore_sysctls(state.get("sysctls", {}))
    shutil.rmtree(STATE, ignore_errors=True)
    for created in map(Path, state.get("created_paths", ())):
        if created.exists():
            shutil.rmtree(created, ignore_errors=True)
        if created.exists():
            left.append(f"path {created}")
    left += leftovers()
    if not quiet:
        if peak is not None and resident is not None:
            print(
                f"localnode: memory of the cluster (daemons and pods): {resident / 2**20:.0f} MiB resident at the end, "
                f"peak {peak / 2**20:.0f} MiB counting page cache",
                file=sys.stderr,
            )
        if restored:
            print(f"localnode: restored sysctls {', '.join(restored)}", file=sys.stderr)
        print("localnode: down" + (f"; LEFT BEHIND: {'; '.join(left)}" if left else ", nothing left"), file=sys.stderr)
    return left


def leftovers() -> list[str]:
    """Anything of the cluster still on this machine."""
    found = []
    if STATE.exists():
        found.append(f"directory {STATE}")
    if host.NETNS_PATH.exists():
        found.append(f"network namespace {host.NETNS}")
    if host.run("ip", "link", "show", host.HOST_VETH, check=False).returncode == 0:
        found.append(f"link {host.HOST_VETH}")
    found += [f"cgroup {h / host.CGROUP_NAME}" for h in host.hierarchies() if (h / host.CGROUP_NAME).exists()]
    found += [f"mount {point}" for point in host.mounts_under(STATE)]
    return found
