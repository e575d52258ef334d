"""What the local node changes on this machine, and how each change is undone.

Everything the cluster creates lives in one of four places, each removable as a whole:

* **a network namespace** (``ccred-localnode``): every daemon and every pod runs in it. Its
  bridge, its pods' veths, kube-proxy's iptables rules and its ``ip_forward`` belong to it, so
  deleting the namespace removes them all; the host's own network and sysctls stay as they were.
  One veth pair joins it to the host (``10.87.0.1`` host side, ``10.87.0.2`` node side) so that
  kubectl and the tests reach the API server and the AWS stand-in; an iptables rule in the
  namespace refuses to forward anything from a pod to the host side, and the namespace has no
  default route: pods reach only the node and each other.
* **a cgroup** (``/ccred-localnode`` in every cgroup v1 hierarchy): the kubelet's ``cgroupRoot``
  and the daemons' own group, so that ``down`` finds every process (containerd's shims and the
  containers included) and the cluster's peak memory is one counter.
* **the state directory** (etcd's data, containerd's root and state, the kubelet's root, logs,
  certificates): every mount made there is unmounted, then the directory is removed.
* **a few fixed host paths** the daemons insist on (``/run/containerd/s`` for containerd's shim
  sockets, ``/var/log/pods`` and ``/var/log/containers`` for the kubelet, ``/var/lib/cni`` for the
  CNI cache, ``/run/netns``): removed on ``down`` when they did not exist before ``up``.

The kubelet also sets a few kernel sysctls on start; their values before ``up`` are kept and
written back on ``down``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

NETNS = "ccred-localnode"
NETNS_PATH = Path("/run/netns") / NETNS
HOST_VETH, NODE_VETH = "ccred-host", "ccred-node"
HOST_IP, NODE_IP = "10.87.0.1", "10.87.0.2"
POD_CIDR, POD_GATEWAY = "10.88.0.0/24", "10.88.0.1"
SERVICE_CIDR, KUBERNETES_SERVICE_IP = "10.96.0.0/24", "10.96.0.1"
CGROUP_NAME = "ccred-localnode"
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Where the daemons themselves run (the kubelet puts pods in <cgroup>/kubepods).
DAEMONS_CGROUP = "daemons"
#: The hierarchies a daemon is moved into: pids finds every process, memory gives the peak.
TRACKING_HIERARCHIES = ("pids", "memory")
#: Host paths the daemons create whatever their configuration says.
FIXED_PATHS = (
    Path("/run/containerd"),
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
    Path("/run/netns"),
)
#: Sysctls the kubelet sets at start (protectKernelDefaults: false); restored on down.
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def in_netns(*command: str) -> list[str]:
    """The command, run in the node's network namespace only (the host's mounts stay shared, which
    the kubelet and containerd need: each must see the other's mounts; ``ip netns exec`` would give
    each its own mount namespace)."""
    return ["nsenter", f"--net={NETNS_PATH}", "--", *command]


# --- network ---------------------------------------------------------------------------------


def create_network() -> None:
    run("ip", "netns", "add", NETNS)
    run("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NODE_VETH, "netns", NETNS)
    run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_VETH)
    run("ip", "link", "set", HOST_VETH, "up")
    for command in (
        ("ip", "link", "set", "lo", "up"),
        ("ip", "addr", "add", f"{NODE_IP}/30", "dev", NODE_VETH),
        ("ip", "link", "set", NODE_VETH, "up"),
        # Pods reach the node's addresses (routed locally) and each other (bridged); forwarding is
        # for kube-proxy's service VIPs. Per namespace: the host's own ip_forward is not touched.
        ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
        # Nothing a pod sends is forwarded to the host side of the link.
        ("iptables", "-I", "FORWARD", "-o", NODE_VETH, "-j", "DROP"),
    ):
        run(*in_netns(*command))


def delete_network() -> None:
    # Deleting the namespace deletes its veth end, hence the pair; its bridge, rules and sysctls.
    if NETNS_PATH.exists():
        run("ip", "netns", "delete", NETNS, check=False)
    run("ip", "link", "delete", HOST_VETH, check=False)


# --- cgroups ---------------------------------------------------------------------------------


def hierarchies(types: tuple[str, ...] = ("cgroup", "cgroup2")) -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup: the v1 ones, and the unified (v2)
    one that hybrid hosts mount beside them, where runc creates groups too."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] in types and fields[4].startswith(str(CGROUP_ROOT) + "/"):
            found.append(Path(fields[4]))
    return sorted(set(found))


def create_cgroups() -> None:
    for hierarchy in hierarchies(("cgroup",)):
        group = hierarchy / CGROUP_NAME
        group.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # A new cpuset is empty and admits no task until it is given the parent's cpus and mems.
            for name in ("cpuset.cpus", "cpuset.mems"):
                (group / name).write_text((hierarchy / name).read_text())
        if hierarchy.name in TRACKING_HIERARCHIES:
            (group / DAEMONS_CGROUP).mkdir(exist_ok=True)


def join_daemons_cgroup() -> None:
    """Run in a daemon's child before exec: it and everything it forks are found by ``down``."""
    for name in TRACKING_HIERARCHIES:
        (CGROUP_ROOT / name / CGROUP_NAME / DAEMONS_CGROUP / "cgroup.procs").write_text(str(os.getpid()))


def cgroup_processes() -> set[int]:
    pids: set[int] = set()
    top = CGROUP_ROOT / "pids" / CGROUP_NAME
    if top.exists():
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def kill_cgroup_processes(grace: float = 5.0) -> None:
    """SIGTERM every process of the cluster, then SIGKILL what is left; wait until none is."""
    for pid in cgroup_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while cgroup_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while (left := cgroup_processes()) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def peak_memory_bytes() -> int | None:
    usage = CGROUP_ROOT / "memory" / CGROUP_NAME / "memory.max_usage_in_bytes"
    with contextlib.suppress(OSError, ValueError):
        return int(usage.read_text())
    return None


def resident_memory_bytes() -> int | None:
    """Anonymous memory of every process of the cluster now (memory.stat's total_rss)."""
    with contextlib.suppress(OSError, ValueError):
        for line in (CGROUP_ROOT / "memory" / CGROUP_NAME / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == "total_rss":
                return int(value)
    return None


def delete_cgroups() -> list[str]:
    """Remove the cluster's cgroups, deepest first; return what could not be removed."""
    left = []
    for hierarchy in hierarchies():
        top = hierarchy / CGROUP_NAME
        if not top.exists():
            continue
        for group in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                group.rmdir()
        try:
            top.rmdir()
        except OSError as exc:
            left.append(f"{top}: {exc.strerror}")
    return left


# --- mounts ----------------------------------------------------------------------------------


def mounts_under(*roots: Path) -> list[str]:
    prefixes = tuple(str(root) for root in roots)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == prefix or point.startswith(prefix + "/") for prefix in prefixes):
            found.append(point)
    return found


def unmount_under(*roots: Path) -> list[str]:
    """Unmount every mount under ``roots``, deepest first (lazily if busy); return what is left."""
    for _ in range(5):
        points = sorted(set(mounts_under(*roots)), key=lambda p: p.count("/"), reverse=True)
        if not points:
            return []
        for point in points:
            if run("umount", point, check=False).returncode != 0:
                run("umount", "-l", point, check=False)
    return mounts_under(*roots)


# --- sysctls ---------------------------------------------------------------------------------


def read_sysctls(names: tuple[str, ...] = KUBELET_SYSCTLS) -> dict[str, str]:
    values = {}
    for name in names:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", *name.split(".")).read_text().strip()
    return values


def restore_sysctls(saved: dict[str, str]) -> list[str]:
    """Write back the saved values that changed; return what was restored."""
    restored = []
    for name, value in saved.items():
        path = Path("/proc/sys", *name.split("."))
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value)
                restored.append(f"{name}={value}")
    return restored
