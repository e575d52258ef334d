"""Benchmark the credential socket: cached GET throughput and latency, operator vs a bare aiohttp server,
on the standard asyncio event loop and on uvloop, in the same run.

Run with ``make bench`` (or ``.venv/bin/python bench/socket_bench.py --help``). See bench/README.md.

For each loop kind of ``--loops`` (default ``asyncio,uvloop``) two servers run side by side:

* the real operator (``connector-credentials run -n NS``, no ``--verbose``, ``CCRED_EVENT_LOOP`` set
  to the kind) against the Kubernetes and AWS stand-ins of ``tests.support`` (a real kube-apiserver,
  moto), serving on a Unix socket;
* a bare aiohttp server (``socket_load.py _bare``) on the **same loop kind**, on another Unix socket,
  answering the same path with the same status, headers and body bytes, captured from that operator.

One load generator (``socket_load.py _client``, a fresh process per run) measures every server: N
keep-alive HTTP/1.1 connections, one request in flight on each, on the loop of ``--client-loop``
(default uvloop when installed: the cheaper client leaves more of the machine to the server), the
same for every server. Runs rotate through the servers and each cell is repeated; the tables show
medians.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts bench/ on sys.path, not the repository root

from socket_load import LOOPS, VOLATILE, fetch_once, stable_headers  # noqa: E402 - bench/ is on sys.path

LOAD = str(Path(__file__).with_name("socket_load.py"))
RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
CREDENTIAL = "bench-credential"
TARGET_RATIO = 0.80
#: What the operator logs at start on each loop (cli/operate.py).
LOOP_LOG = {"asyncio": "Running on the standard asyncio event loop", "uvloop": "Running on uvloop "}

Answer = tuple[int, list[tuple[str, str]], bytes]


def run_client(sock_path: str, path: str, clients: int, warmup: float, duration: float, loop: str) -> dict[str, Any]:
    """The load generator in its own process; returns its summary."""
    cmd = [sys.executable, LOAD, "_client", sock_path, path, str(clients), str(warmup), str(duration), loop]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} non-200 answers from {sock_path} at {clients} clients")
    return result


def wait_for_200(sock_path: str, path: str, timeout: float) -> Answer:
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


def start_bare(workdir: Path, loop: str, answer: Answer) -> tuple[subprocess.Popen[bytes], str]:
    """A bare server on ``loop`` sending ``answer``'s bytes; returns it and its socket path."""
    status, headers, body = answer
    spec = {
        "status": status,
        # The response headers the operator's handler sets; aiohttp adds Date, Server, Content-Length.
        "headers": [(k, v) for k, v in headers if k.lower() not in VOLATILE],
        "body": base64.b64encode(body).decode("ascii"),
    }
    spec_path = workdir / f"bare-{loop}.json"
    spec_path.touch(mode=0o600)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    sock_path = str(workdir / f"bare-{loop}.sock")
    proc = subprocess.Popen(
        [sys.executable, LOAD, "_bare", sock_path, str(spec_path), loop],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the bare server on {loop} did not start (exit code {proc.returncode})")
    return proc, sock_path


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


def parse_loops(text: str) -> list[str]:
    loops = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [loop for loop in loops if loop not in LOOPS]
    if not loops or unknown or len(set(loops)) != len(loops):
        raise SystemExit(f"--loops takes distinct values among {', '.join(LOOPS)}, not {text!r}")
    return loops


def bench(args: argparse.Namespace) -> int:
    from tests.support.awsemu import AwsEmulator, irsa_env
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.runner import OperatorProcess, console_script

    clients_list = [int(c) for c in args.clients.split(",")]
    loops = parse_loops(args.loops)
    if "uvloop" in (*loops, args.client_loop) and importlib.util.find_spec("uvloop") is None:
        raise SystemExit("uvloop is not installed in this venv (make venv installs it); or pass --loops asyncio")
    workdir = Path(tempfile.mkdtemp(prefix="ccb-", dir="/tmp"))  # Unix socket paths must stay short
    operators: dict[str, Any] = {}
    bares: dict[str, subprocess.Popen[bytes]] = {}
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
            kubeconfig = kube.write_kubeconfig(
                workdir / "kubeconfig", token=kube.service_account_token(namespace), namespace=namespace
            )
            path = f"/v1/credentials/{namespace}/{CREDENTIAL}"
            servers: dict[str, tuple[str, Any]] = {}  # name -> (socket, the process: .pid)
            answers: dict[str, Answer] = {}
            for loop in loops:
                # Two replicas of one namespace, as in a two-pod Deployment: each reads and serves on its own.
                op_sock = str(workdir / f"op-{loop}.sock")
                operator = operators[loop] = OperatorProcess(
                    namespace=namespace,
                    kubeconfig=kubeconfig,
                    aws_env=irsa_env(workdir, aws.endpoint, role_arn=ROLE_ARN),
                    socket_path=op_sock,
                    extra_env={"CCRED_EVENT_LOOP": loop},
                    log_path=workdir / f"operator-{loop}.log",
                    home=workdir / f"home-{loop}",
                    command=[console_script(), "run", "-n", namespace],  # no --verbose: production logging
                )
                operator.start()
                said = operator.wait_for_log("Running on ", timeout=30)
                require(LOOP_LOG[loop] in said, f"CCRED_EVENT_LOOP={loop}, but the operator says: {said}")
                operator.wait_for_log("Serving credentials on", timeout=30)
                # The first 200 is the read that goes to AWS; everything after it is served from memory.
                answer = answers[loop] = wait_for_200(op_sock, path, timeout=30)
                cached = fetch_once(op_sock, path)
                require(
                    cached[0] == 200 and cached[2] == answer[2],
                    f"the cached read differs from the first on {loop} (HTTP {cached[0]})",
                )
                bare, bare_sock = start_bare(workdir, loop, answer)
                bares[loop] = bare
                bare_answer = fetch_once(bare_sock, path)
                same = (bare_answer[0], stable_headers(bare_answer[1]), bare_answer[2]) == (
                    answer[0],
                    stable_headers(answer[1]),
                    answer[2],
                )
                require(same, f"the bare server's response on {loop} differs from the operator's")
                servers[f"bare/{loop}"] = (bare_sock, bare)
                servers[f"operator/{loop}"] = (op_sock, operator)

            first = answers[loops[0]]
            print("connector-credentials socket benchmark: cached GET /v1/credentials/{ns}/{name}")
            print(
                f"env: {os.cpu_count()} CPUs (shared machine), Python {platform.python_version()} "
                f"({platform.machine()}), aiohttp {_version('aiohttp')}, "
                f"uvloop {_version('uvloop') if importlib.util.find_spec('uvloop') else '-'}, "
                f"{platform.system()} {platform.release()}"
            )
            shown = ", ".join(f"{k}: {v}" for k, v in stable_headers(first[1]))
            print(f"response: HTTP {first[0]}, {len(first[2])}-byte body, {shown} (identical on each pair)")
            print(
                f"servers: per loop kind ({', '.join(loops)}), the operator with CCRED_EVENT_LOOP=<kind> and a bare "
                "aiohttp server on the same kind"
            )
            print(
                f"load: {args.warmup:g}s warm-up + {args.duration:g}s measured per run, one keep-alive connection "
                f"per client, client on {args.client_loop} for every server, server and client in separate "
                f"processes; {args.repeats} runs per cell, rotating through the {len(servers)} servers"
            )
            print("note: the machine is shared and noisy; every figure is the median of the runs.\n", flush=True)

            names = list(servers)
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rep in range(args.repeats):
                for index, clients in enumerate(clients_list):
                    shift = (rep + index) % len(names)
                    for name in names[shift:] + names[:shift]:
                        dead = [n for n, (_, proc) in servers.items() if _exited(proc)]
                        require(not dead, f"a server exited during the benchmark: {', '.join(dead)}")
                        sock_path, proc = servers[name]
                        cpu_before = process_cpu(proc.pid)
                        result = run_client(sock_path, path, clients, args.warmup, args.duration, args.client_loop)
                        # The server's CPU time over the whole client run, per response (warm-up included).
                        result["cpu_us"] = (process_cpu(proc.pid) - cpu_before) / max(1, result["total"]) * 1e6
                        results.setdefault((name, clients), []).append(result)
                        if args.progress:
                            print(
                                f"  run {rep + 1} {name:16} c={clients:<3} {result['rps']:8.0f} req/s  "
                                f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                                f"server CPU {result['cpu_us']:.0f} us/req",
                                file=sys.stderr,
                            )
            medians = {key: _medians(runs) for key, runs in results.items()}
            for loop in loops:
                print_table(medians, clients_list, loop)
            if len(loops) == 2:
                print_comparison(medians, clients_list, *loops)
            print(f"\n(total {time.monotonic() - started:.0f}s)", flush=True)
            require(all(op.returncode is None for op in operators.values()), "an operator exited during the run")
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        for loop, operator in operators.items():
            print(f"operator ({loop}) output (tail):\n{operator.output[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for bare in bares.values():
            stop_process(bare)
        for operator in operators.values():
            operator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _exited(proc: Any) -> bool:
    return (proc.poll() if isinstance(proc, subprocess.Popen) else proc.returncode) is not None


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: float(statistics.median(r[key] for r in runs)) for key in ("rps", "p50_ms", "p99_ms", "cpu_us")}


def print_table(medians: dict[tuple[str, int], dict[str, float]], clients_list: list[int], loop: str) -> None:
    print(f"loop: {loop} (operator with CCRED_EVENT_LOOP={loop}, bare server on {loop})")
    header = (
        f"{'clients':>7} | {'bare req/s':>10} | {'operator req/s':>14} | {'ratio':>5} | "
        f"{'bare p50/p99 ms':>15} | {'operator p50/p99 ms':>19} | {'server CPU us/req bare/op':>25}"
    )
    print(header)
    print("-" * len(header))
    worst = math.inf
    for clients in clients_list:
        bare, op = medians[(f"bare/{loop}", clients)], medians[(f"operator/{loop}", clients)]
        ratio = op["rps"] / bare["rps"]
        worst = min(worst, ratio)
        print(
            f"{clients:>7} | {bare['rps']:>10,.0f} | {op['rps']:>14,.0f} | {ratio:>5.0%} | "
            f"{fmt_lat(bare['p50_ms'], bare['p99_ms']):>15} | {fmt_lat(op['p50_ms'], op['p99_ms']):>19} | "
            f"{bare['cpu_us']:>12.0f} / {op['cpu_us']:<10.0f}"
        )
    verdict = "meets" if worst >= TARGET_RATIO else "is below"
    print(
        f"ratio = operator req/s / bare req/s on {loop}; the lowest ({worst:.0%}) {verdict} the "
        f"{TARGET_RATIO:.0%} target.\n"
        "server CPU = the server process's user+system time per response, a steadier cost figure on a busy machine.\n"
    )


def print_comparison(
    medians: dict[tuple[str, int], dict[str, float]], clients_list: list[int], base: str, other: str
) -> None:
    print(f"{other} against {base} (medians above; ratio = {other} req/s / {base} req/s, CPU = us per response)")
    header = (
        f"{'clients':>7} | {'operator ' + base:>16} | {'operator ' + other:>15} | {'ratio':>5} | "
        f"{'bare ' + base:>12} | {'bare ' + other:>11} | {'ratio':>5} | {'operator CPU ' + base + '/' + other:>27}"
    )
    print(header)
    print("-" * len(header))
    for clients in clients_list:
        op_a, op_b = medians[(f"operator/{base}", clients)], medians[(f"operator/{other}", clients)]
        bare_a, bare_b = medians[(f"bare/{base}", clients)], medians[(f"bare/{other}", clients)]
        print(
            f"{clients:>7} | {op_a['rps']:>16,.0f} | {op_b['rps']:>15,.0f} | {op_b['rps'] / op_a['rps']:>5.0%} | "
            f"{bare_a['rps']:>12,.0f} | {bare_b['rps']:>11,.0f} | {bare_b['rps'] / bare_a['rps']:>5.0%} | "
            f"{op_a['cpu_us']:>13.0f} / {op_b['cpu_us']:<13.0f}"
        )


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated (default 1,16,64)")
    parser.add_argument(
        "--loops", default="asyncio,uvloop", help="event loops of the servers, comma-separated (default asyncio,uvloop)"
    )
    parser.add_argument(
        "--client-loop",
        choices=LOOPS,
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        help="the load generator's loop, the same for every server (default uvloop when installed: the cheaper client)",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell and server; medians shown (default 3)")
    parser.add_argument("--progress", action="store_true", help="print every run to stderr as it finishes")
    return bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
