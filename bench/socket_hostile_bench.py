"""/healthz and a cached read on the credential socket beside 1,000 idle and half-sent connections.

Run with ``.venv/bin/python bench/socket_hostile_bench.py`` (``--help`` for options). See bench/README.md.

The real operator (``connector-credentials run -n NS``, no ``--verbose``) runs against a real
kube-apiserver and moto, as in bench/socket_bench.py. For each row the script opens 1,000
connections to its socket (in turn: nothing sent, half a request line, headers without the blank
line), then sends ``--requests`` sequential ``GET /healthz`` and cached ``GET`` requests, each on a
fresh connection (as a probe or a new client would), and prints the latency of each kind
(median, p99, worst) and how many of the 1,000 the operator held. Rows:

* no other connections (the baseline);
* 1,000 held: ``CCRED_MAX_CONNECTIONS=1100``, so the operator keeps every one of them;
* the default limit (256): the operator keeps the newest 256 and closed the rest to make room.

``CCRED_HEADER_TIMEOUT`` is set to 300 s in both, so nothing is closed for being slow while measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts bench/ on sys.path, not the repository root

RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
CREDENTIAL = "bench-credential"


def get(sock_path: str, path: str, timeout: float = 10.0) -> int:
    """One GET on a fresh connection; the status (the body is read to its end)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(sock_path)
        sock.settimeout(timeout)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode("ascii"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def open_connections(sock_path: str, namespace: str, count: int, stack: contextlib.ExitStack) -> list[socket.socket]:
    sent = [b"", f"GET /v1/credentials/{namespace}/be".encode(), b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"]
    held = []
    for index in range(count):
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.connect(sock_path)  # blocking: waits for room in the listen backlog
        if sent[index % 3]:
            sock.sendall(sent[index % 3])
        held.append(sock)
    return held


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def measure(sock_path: str, path: str, requests: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {"healthz": [], "cached read": []}
    for _ in range(requests):
        for kind, target in (("healthz", "/healthz"), ("cached read", path)):
            started = time.perf_counter()
            status = get(sock_path, target)
            latencies[kind].append(time.perf_counter() - started)
            require(status == 200, f"{kind} answered {status}")
    return latencies


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def bench(args: argparse.Namespace) -> int:
    from tests.support.awsemu import AwsEmulator, irsa_env
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.runner import OperatorProcess, console_script

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < args.connections + 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 512), hard))
    workdir = Path(tempfile.mkdtemp(prefix="cch-", dir="/tmp"))  # Unix socket paths must stay short
    operators: list[OperatorProcess] = []
    try:
        with ControlPlane() as plane, AwsEmulator() as aws:
            kube = Cluster(plane)
            kube.apply_crds()
            namespace = f"bench-{uuid.uuid4().hex[:8]}"
            kube.create_namespace(namespace)
            kube.install_operator_identity(namespace)
            arn = aws.create_secret(f"xpander/{namespace}/{CREDENTIAL}", string=f"bench-{uuid.uuid4().hex}")
            kube.create(
                RESOURCE,
                namespace,
                {
                    "apiVersion": "connectors.xpander.ai/v1alpha1",
                    "kind": "ConnectorCredential",
                    "metadata": {"name": CREDENTIAL, "namespace": namespace},
                    "spec": {"secretArn": arn},
                },
            )
            kubeconfig = kube.write_kubeconfig(
                workdir / "kubeconfig", token=kube.service_account_token(namespace), namespace=namespace
            )
            path = f"/v1/credentials/{namespace}/{CREDENTIAL}"
            print("connector-credentials socket under idle connections: fresh-connection GETs, sequential")
            print(
                f"env: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()} "
                f"{platform.release()}; {args.requests} requests of each kind per row, {args.connections} connections"
            )
            heads = ("row", "held", "healthz p50 / p99 / max ms", "cached read p50 / p99 / max ms")
            print(f"\n{heads[0]:<38} | {heads[1]:>5} | {heads[2]:>27} | {heads[3]:>31}")
            rows = [
                ("no other connections", "1100", 0),
                (f"{args.connections} idle, all held (limit 1100)", "1100", args.connections),
                (f"{args.connections} idle, default limit (256)", "256", args.connections),
            ]
            sockets: dict[str, str] = {}
            for label, limit, count in rows:
                if limit not in sockets:
                    sock_path = sockets[limit] = str(workdir / f"op-{limit}.sock")
                    operator = OperatorProcess(
                        namespace=namespace,
                        kubeconfig=kubeconfig,
                        aws_env=irsa_env(workdir, aws.endpoint, role_arn=ROLE_ARN),
                        socket_path=sock_path,
                        extra_env={"CCRED_MAX_CONNECTIONS": limit, "CCRED_HEADER_TIMEOUT": "300"},
                        log_path=workdir / f"operator-{limit}.log",
                        home=workdir / f"home-{limit}",
                        command=[console_script(), "run", "-n", namespace],  # production logging
                    )
                    operators.append(operator.start())
                    operator.wait_for_log("Serving credentials on", timeout=30)
                    deadline = time.monotonic() + 30
                    while get(sock_path, path) != 200:
                        require(time.monotonic() < deadline, "the credential never answered 200")
                        time.sleep(0.1)
                    measure(sock_path, path, 50)  # warm up
                with contextlib.ExitStack() as stack:
                    held = open_connections(sockets[limit], namespace, count, stack)
                    time.sleep(0.5)  # let the operator close the ones that made room (not a verdict)
                    kept = sum(1 for sock in held if still_open(sock))
                    latencies = measure(sockets[limit], path, args.requests)
                cells = [
                    f"{statistics.median(v) * 1e3:6.2f} / {p99(v) * 1e3:6.2f} / {max(v) * 1e3:6.1f}"
                    for v in latencies.values()
                ]
                print(f"{label:<38} | {kept:>5} | {cells[0]:>27} | {cells[1]:>31}", flush=True)
            require(all(op.returncode is None for op in operators), "an operator exited during the benchmark")
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        for operator in operators:
            print(f"operator output (tail):\n{operator.output[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for operator in operators:
            operator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000, help="idle connections to open (default 1000)")
    parser.add_argument("--requests", type=int, default=500, help="requests of each kind per row (default 500)")
    return bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
