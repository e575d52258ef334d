"""Benchmark the credential socket: cached GET throughput and latency, operator vs a bare aiohttp server.

Run with ``make bench`` (or ``.venv/bin/python bench/socket_bench.py --help``). See bench/README.md.

Three kinds of process take part, each started from this file:

* the real operator (``connector-credentials run -n NS``, no ``--verbose``) against the Kubernetes
  and AWS stand-ins of ``tests.support`` (a real kube-apiserver, moto), serving on a Unix socket;
* a bare aiohttp server (``_bare``) on another Unix socket, answering the same path with the same
  status, headers and body bytes, captured from the operator first;
* a load generator (``_client``): N keep-alive HTTP/1.1 connections, one request in flight on each,
  driven by a minimal ``asyncio.Protocol`` (no streams, no HTTP library) so that it costs little.

Runs alternate between the two servers and each cell is repeated; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
CREDENTIAL = "bench-credential"
#: Headers that legitimately differ between two servers or two responses (not part of the "same bytes").
VOLATILE = {"date", "server", "content-length", "connection", "keep-alive"}
TARGET_RATIO = 0.80


# --- a raw HTTP/1.1 exchange over a Unix socket (set-up and verification only) ------------------


def request_bytes(path: str) -> bytes:
    """The request every client sends (what a controller's keep-alive client sends, give or take)."""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n".encode("ascii")


def fetch_once(sock_path: str, path: str, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """One GET on a fresh connection: (status, headers in order, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(request_bytes(path))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the response headers")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the end of the body")
            rest += chunk
        return status, headers, rest[:length]


def stable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in headers if k.lower() not in VOLATILE)


# --- the bare server (a separate process) --------------------------------------------------------


def bare_server_main(sock_path: str, spec_path: str) -> None:
    """A minimal aiohttp server: one pre-built answer to every request, no checks at all."""
    from aiohttp import web

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    body = base64.b64decode(spec["body"])
    headers = [(k, v) for k, v in spec["headers"]]
    status = int(spec["status"])

    async def handle(_request: web.BaseRequest) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    async def main() -> None:
        # aiohttp's low-level server (no Application, no router), as the operator uses: the cheapest
        # aiohttp server there is, with the same keep-alive and logging options.
        server = web.Server(handle, keepalive_timeout=30.0, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(sock_path)
        sock.listen(512)
        sock.setblocking(False)
        await web.SockSite(runner, sock, backlog=512).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# --- the load generator (a separate process) -----------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request in flight; the next request leaves from data_received."""

    def __init__(self, request: bytes, run: _Run) -> None:
        self.request = request
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # total bytes of the current response once its head is parsed
        self.sent_at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._finish(ConnectionError("response without Content-Length"))
                return
            eol = head.find(b"\r\n", at + 2)
            self.need = end + 4 + int(head[at + 17 : eol if eol >= 0 else len(head)])
        if len(buffer) < self.need:
            return
        now = time.perf_counter()
        ok = buffer[9:12] == b"200"
        del buffer[: self.need]
        self.need = -1
        run = self.run
        run.total += 1
        if not ok:
            run.errors += 1
        if run.start <= now <= run.end:
            run.latencies.append(now - self.sent_at)
        if buffer:
            self._finish(ConnectionError("unexpected bytes after a response"))
        elif now >= run.end:
            self._finish(None)
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class _Run:
    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.latencies: list[float] = []
        self.errors = 0
        self.total = 0  # every response, warm-up included


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _load(sock_path: str, path: str, clients: int, warmup: float, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run()
    request = request_bytes(path)
    conns: list[_Connection] = []
    try:
        for _ in range(clients):
            _transport, conn = await loop.create_unix_connection(lambda: _Connection(request, run), sock_path)
            conns.append(conn)
        run.start = time.perf_counter() + warmup
        run.end = run.start + duration
        for conn in conns:
            conn.send()
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), timeout=warmup + duration + 30)
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    latencies = sorted(run.latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": run.errors,
        "total": run.total,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def client_main(sock_path: str, path: str, clients: int, warmup: float, duration: float) -> None:
    gc.disable()  # only floats are allocated during the run; no cycles to collect
    print(json.dumps(asyncio.run(_load(sock_path, path, clients, warmup, duration))), flush=True)


def run_client(sock_path: str, path: str, clients: int, warmup: float, duration: float) -> dict[str, Any]:
    """The load generator in its own process; returns its summary."""
    cmd = [sys.executable, __file__, "_client", sock_path, path, str(clients), str(warmup), str(duration)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} non-200 answers from {sock_path} at {clients} clients")
    return result


# --- orchestration -------------------------------------------------------------------------------


def wait_for_200(sock_path: str, path: str, timeout: float) -> tuple[int, list[tuple[str, str]], bytes]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            answer = fetch_once(sock_path, path)
        except OSError as exc:
            last = exc
        else:
            if answer[0] == 200:
                return answer
            last = f"HTTP {answer[0]}"
        time.sleep(0.1)
    raise RuntimeError(f"{sock_path} did not answer 200 for {path} within {timeout:.0f}s (last: {last})")


def start_bare(workdir: Path, path: str, answer: tuple[int, list[tuple[str, str]], bytes]) -> subprocess.Popen[bytes]:
    status, headers, body = answer
    spec = {
        "status": status,
        # The response headers the operator's handler sets; aiohttp adds Date, Server, Content-Length.
        "headers": [(k, v) for k, v in headers if k.lower() not in VOLATILE],
        "body": base64.b64encode(body).decode("ascii"),
    }
    spec_path = workdir / "bare.json"
    spec_path.touch(mode=0o600)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    sock_path = str(workdir / "bare.sock")
    proc = subprocess.Popen(
        [sys.executable, __file__, "_bare", sock_path, str(spec_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the bare server did not start (exit code {proc.returncode})")
    return proc


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt_lat(p50: float, p99: float) -> str:
    return f"{p50:.2f} / {p99:.2f}"


def bench(args: argparse.Namespace) -> int:
    from tests.support.awsemu import AwsEmulator, irsa_env
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.runner import OperatorProcess, console_script

    clients_list = [int(c) for c in args.clients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="ccb-", dir="/tmp"))  # Unix socket paths must stay short
    operator: OperatorProcess | None = None
    bare: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        with ControlPlane() as plane, AwsEmulator() as aws:
            kube = Cluster(plane)
            kube.apply_crds()
            namespace = f"bench-{uuid.uuid4().hex[:8]}"
            kube.create_namespace(namespace)
            kube.install_operator_identity(namespace)
            value = f"bench-{uuid.uuid4().hex}{uuid.uuid4().hex}"  # a 70-character token
            arn = aws.create_secret(f"xpander/{namespace}/{CREDENTIAL}", string=value)
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
            op_sock = str(workdir / "op.sock")
            operator = OperatorProcess(
                namespace=namespace,
                kubeconfig=kube.write_kubeconfig(
                    workdir / "kubeconfig", token=kube.service_account_token(namespace), namespace=namespace
                ),
                aws_env=irsa_env(workdir, aws.endpoint, role_arn=ROLE_ARN),
                socket_path=op_sock,
                log_path=workdir / "operator.log",
                home=workdir / "home",
                command=[console_script(), "run", "-n", namespace],  # no --verbose: production logging
            )
            operator.start()
            operator.wait_for_log("Serving credentials on", timeout=30)
            path = f"/v1/credentials/{namespace}/{CREDENTIAL}"
            # The first 200 is the read that goes to AWS; everything after it is served from memory.
            answer = wait_for_200(op_sock, path, timeout=30)
            cached = fetch_once(op_sock, path)
            require(
                cached[0] == 200 and cached[2] == answer[2],
                f"the cached read differs from the first (HTTP {cached[0]})",
            )

            bare = start_bare(workdir, path, answer)
            bare_sock = str(workdir / "bare.sock")
            bare_answer = fetch_once(bare_sock, path)
            same = (bare_answer[0], stable_headers(bare_answer[1]), bare_answer[2]) == (
                answer[0],
                stable_headers(answer[1]),
                answer[2],
            )
            require(same, "the bare server's response differs from the operator's")

            print("connector-credentials socket benchmark: cached GET /v1/credentials/{ns}/{name}")
            print(
                f"env: {os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.machine()}), "
                f"aiohttp {_version('aiohttp')}, {platform.system()} {platform.release()}"
            )
            shown = ", ".join(f"{k}: {v}" for k, v in stable_headers(answer[1]))
            print(f"response: HTTP {answer[0]}, {len(answer[2])}-byte body, {shown} (identical on both servers)")
            print(
                f"load: {args.warmup:g}s warm-up + {args.duration:g}s measured per run, one keep-alive connection "
                f"per client, server and client in separate processes; {args.repeats} runs per cell, "
                "alternating bare/operator"
            )
            print("note: the machine is shared and noisy; every figure is the median of the runs.\n", flush=True)

            servers = {"bare": bare_sock, "operator": op_sock}
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rep in range(args.repeats):
                for clients in clients_list:
                    order = (
                        ["bare", "operator"] if (rep + clients_list.index(clients)) % 2 == 0 else ["operator", "bare"]
                    )
                    for name in order:
                        alive = operator.returncode is None and bare.poll() is None
                        require(alive, "a server exited during the benchmark")
                        pid = operator.pid if name == "operator" else bare.pid
                        cpu_before = process_cpu(pid)
                        result = run_client(servers[name], path, clients, args.warmup, args.duration)
                        # The server's CPU time over the whole client run, per response (warm-up included).
                        result["cpu_us"] = (process_cpu(pid) - cpu_before) / max(1, result["total"]) * 1e6
                        results.setdefault((name, clients), []).append(result)
                        if args.progress:
                            print(
                                f"  run {rep + 1} {name:8} c={clients:<3} {result['rps']:8.0f} req/s  "
                                f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms",
                                file=sys.stderr,
                            )
            print_table(results, clients_list)
            print(f"\n(total {time.monotonic() - started:.0f}s)", flush=True)
            require(operator.returncode is None, "the operator exited during the benchmark")
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        if operator is not None:
            print(f"operator output (tail):\n{operator.output[-3000:]}", file=sys.stderr)
        return 1
    finally:
        stop_process(bare)
        if operator is not None:
            operator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_table(results: dict[tuple[str, int], list[dict[str, Any]]], clients_list: list[int]) -> None:
    header = (
        f"{'clients':>7} | {'bare req/s':>10} | {'operator req/s':>14} | {'ratio':>5} | "
        f"{'bare p50/p99 ms':>15} | {'operator p50/p99 ms':>19} | {'server CPU us/req bare/op':>25}"
    )
    print(header)
    print("-" * len(header))
    worst = math.inf
    for clients in clients_list:
        med = {
            name: {
                key: statistics.median(r[key] for r in results[(name, clients)])
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us")
            }
            for name in ("bare", "operator")
        }
        bare, op = med["bare"], med["operator"]
        ratio = op["rps"] / bare["rps"]
        worst = min(worst, ratio)
        print(
            f"{clients:>7} | {bare['rps']:>10,.0f} | {op['rps']:>14,.0f} | {ratio:>5.0%} | "
            f"{fmt_lat(bare['p50_ms'], bare['p99_ms']):>15} | {fmt_lat(op['p50_ms'], op['p99_ms']):>19} | "
            f"{bare['cpu_us']:>12.0f} / {op['cpu_us']:<10.0f}"
        )
    verdict = "meets" if worst >= TARGET_RATIO else "is below"
    print(
        f"\nratio = operator req/s / bare req/s; the lowest ({worst:.0%}) {verdict} the {TARGET_RATIO:.0%} target.\n"
        "server CPU = the server process's user+system time per response, a steadier cost figure on a busy machine."
    )


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        bare_server_main(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        sock_path, path, clients, warmup, duration = sys.argv[2:7]
        client_main(sock_path, path, int(clients), float(warmup), float(duration))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated (default 1,16,64)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell and server; medians shown (default 3)")
    parser.add_argument("--progress", action="store_true", help="print every run to stderr as it finishes")
    return bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
