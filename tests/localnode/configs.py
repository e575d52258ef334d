"""The configuration files of the local node's daemons, as text: one function each."""

from __future__ import annotations

import json
from pathlib import Path

from tests.localnode.host import CGROUP_NAME, NODE_IP, POD_CIDR

NODE_NAME = "ccred-localnode"
PAUSE_IMAGE = "localhost/ccred-pause:3.10"


def containerd(state: Path) -> str:
    """containerd 1.6 with the CRI plugin, all of its paths in the state directory."""
    return f"""\
version = 2
root = "{state}/containerd/root"
state = "{state}/containerd/state"
# Not wanted here: /opt/containerd (the opt plugin) and snapshotters this host cannot use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{state}/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # A negative oom_score_adj (the kubelet asks one for critical pods) is refused on this host:
  # without this every sandbox fails ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pod network namespaces under the state directory, so that down finds and removes them.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni/net.d"
"""


def cni(state: Path) -> str:
    """A bridge in the node's namespace; no masquerade: pods reach nothing outside the node."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "ccred-localnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "ccred0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(state / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet(state: Path, *, ca: Path, serving: tuple[Path, Path], healthz_port: int) -> str:
    return json.dumps(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            # As on EKS: the API server's client certificate for logs/exec, authorized by the API server.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{state}/containerd.sock",
            "cgroupDriver": "cgroupfs",
            # Under one cgroup of the cluster's own, which down removes.
            "cgroupRoot": f"/{CGROUP_NAME}",
            # The host has cgroup v1, which 1.35 refuses by default; and swap may be on.
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(state / "pods-logs"),
            "resolvConf": "",  # no DNS in this cluster: everything is reached by address
            "clusterDomain": "cluster.local",
            "registerNode": True,
            "maxPods": 32,
            "serializeImagePulls": False,
            # A shared machine's disk and memory are not this node's to defend.
            "evictionHard": {"memory.available": "64Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "shutdownGracePeriod": "0s",
            # Pods' status (and a restarted container) show up within a second or two.
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "fileCheckFrequency": "20s",
            "protectKernelDefaults": False,
        },
        indent=2,
    )


def kube_proxy(*, kubeconfig: Path, metrics_port: int, healthz_port: int) -> str:
    return json.dumps(
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "bindAddress": NODE_IP,
            "metricsBindAddress": f"127.0.0.1:{metrics_port}",
            "healthzBindAddress": f"127.0.0.1:{healthz_port}",
            # Zeros: leave the host-wide conntrack sysctls alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        },
        indent=2,
    )


def irsa_webhook_configuration(*, port: int, ca_bundle: str) -> dict[str, object]:
    """EKS's own registration of the pod identity webhook (its deploy/mutatingwebhook.yaml), with a
    ``url`` on the node instead of a Service."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "pod-identity-webhook"},
        "webhooks": [
            {
                "name": "pod-identity-webhook.amazonaws.com",
                "failurePolicy": "Ignore",
                "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate", "caBundle": ca_bundle},
                "objectSelector": {
                    "matchExpressions": [
                        {"key": "eks.amazonaws.com/skip-pod-identity-webhook", "operator": "DoesNotExist"}
                    ]
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "sideEffects": "None",
                "admissionReviewVersions": ["v1beta1"],
            }
        ],
    }
