"""Where the operator's memory goes at N credentials: a debug run of the scale benchmark's first pass.

Run from the repository root with the project's venv (not run by ``make bench``)::

    .venv/bin/python bench/memory_breakdown.py --sizes 1000
    .venv/bin/python bench/memory_breakdown.py --sizes 1000 --tracemalloc 1      # and what Python allocated, by line
    .venv/bin/python bench/memory_breakdown.py --sizes 1000 --env MALLOC_TRIM_THRESHOLD_=65536

The world is the scale benchmark's (bench/scale.py: a real kube-apiserver + etcd behind the recording
proxy, moto, N secrets of 200 bytes and N ConnectorCredentials declared before the operator starts, 4
threads reading on demand during the first pass, /metrics scraped 5 times after it), but the operator
runs under bench/memprobe.py, which on a signal sizes what it holds. Two reports per N: right after the
scrapes (``VmHWM`` is then what scale.py reports as the peak), and ``--settle`` seconds later, before
and after ``gc.collect()`` and glibc's ``malloc_trim(0)``.

With ``--tracemalloc N`` Python's allocations are traced (N frames; slower, and the process is bigger):
the report then also shows, near the traced peak and at the end, the bytes by file and by line.
Sizes are ``sys.getsizeof`` over ``gc.get_referents``, each object counted once (see bench/memprobe.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import scale  # bench/scale.py: `python bench/x.py` puts bench/ on sys.path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "bench" / "memprobe.py"


def start_probed(
    env: scale.Env, namespace: str, token: str, workdir: Path, metrics_port: int, extra: dict[str, str]
) -> Any:
    from tests.support.awsemu import irsa_env
    from tests.support.runner import OperatorProcess

    kubeconfig = env.cluster.write_kubeconfig(
        workdir / "kubeconfig", token=token, namespace=namespace, server=env.kube_proxy.url
    )
    out = workdir / "probe"
    out.mkdir()
    extra_env = {
        "CCRED_SHUTDOWN_DRAIN": "0",
        "CCRED_METRICS_BIND_ADDRESS": f"127.0.0.1:{metrics_port}",
        "CCRED_PROBE_OUT": str(out),
        "CCRED_PROBE_TRACEMALLOC": str(env.args.tracemalloc),
        **extra,
    }
    return OperatorProcess(
        namespace=namespace,
        kubeconfig=kubeconfig,
        aws_env=irsa_env(workdir, env.proxy.endpoint, role_arn=scale.ROLE_ARN),
        socket_path=str(workdir / "c.sock"),
        extra_env=extra_env,
        log_path=workdir / "operator.log",
        home=workdir / "home",
        command=[sys.executable, str(PROBE), "run", "-n", namespace],
    )


def ask(operator: Any, out: Path, index: int, sig: int, timeout: float) -> dict[str, Any]:
    operator.send_signal(sig)
    path = out / f"report-{index}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise scale.BenchError(f"no memory report {index} within {timeout:.0f} s")
        time.sleep(0.1)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


class Curve(threading.Thread):
    """The operator's VmRSS every 0.25 s, with how many verdicts the last listing showed."""

    def __init__(self, pid: int | None, ready: scale.Readiness) -> None:
        super().__init__(name="rss-curve", daemon=True)
        self._pid, self._ready = pid, ready
        self.points: list[tuple[float, float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(0.25):
            rss = scale.proc_status(self._pid, "VmRSS")
            if rss:
                self.points.append((time.monotonic() - self._t0, rss, len(self._ready.ready)))

    def stop(self) -> list[tuple[float, float, int]]:
        self._halt.set()
        self.join(5)
        return self.points


def measure(env: scale.Env, n: int, arns: list[str], label: str, extra: dict[str, str]) -> dict[str, Any]:
    args = env.args
    names = [f"c{i:05d}" for i in range(n)]
    budget = args.deadline_base + n * args.deadline_per_credential
    result: dict[str, Any] = {"n": n, "label": label, "env": extra}
    with scale.namespace_with_identity(env, str(n)) as (namespace, token, workdir):
        scale.progress(f"N={n} [{label}]: creating {n} ConnectorCredentials in {namespace}")
        scale.create_objects(
            env.cluster.url, env.context, namespace, names, arns, {"refreshInterval": args.refresh_interval}, 8
        )
        port = scale.free_port()
        operator = start_probed(env, namespace, token, workdir, port, extra)
        socket_path = str(workdir / "c.sock")
        ready = scale.Readiness(env.cluster.url, env.context, namespace)
        reads, done = scale.Reads(), threading.Event()
        try:
            t0 = time.monotonic()
            deadline = t0 + budget * (3 if args.tracemalloc else 1)
            operator.start()
            ready.start()
            curve = Curve(operator.pid, ready)
            curve.start()
            scale.wait_for(
                lambda: scale.healthz_status(socket_path, 0.5) is not None or not operator.running,
                t0 + 120,
                "the socket",
                0.02,
            )
            scale.check_operator(operator, "start-up")
            result["rss_idle"] = scale.proc_status(operator.pid, "VmRSS")
            scale.wait_for(
                lambda: scale.healthz_status(socket_path) == 200 or not operator.running, t0 + 120, "/healthz", 0.02
            )
            readers = [
                threading.Thread(
                    target=scale.on_demand_reader,
                    args=(socket_path, namespace, names, ready, reads, done, deadline),
                    daemon=True,
                )
                for _ in range(args.readers)
            ]
            for reader in readers:
                reader.start()
            if args.early_at:
                time.sleep(max(0.0, t0 + args.early_at - time.monotonic()))
                result["early"] = ask(operator, workdir / "probe", 1, signal.SIGUSR1, 600)
                result["early"]["verdicts"] = len(ready.ready)
            t_all = ready.wait_all(n, deadline)
            done.set()
            ready.stop()
            for reader in readers:
                reader.join(10)
            result["first_pass_s"] = t_all - t0
            result["hwm_before_scrapes"] = scale.proc_status(operator.pid, "VmHWM")
            scale.scrape_metrics(port, n)
            result["hwm_after_pass"] = scale.proc_status(operator.pid, "VmHWM")
            scale.progress(
                f"N={n} [{label}]: all verdicts after {t_all - t0:.1f} s; peak {result['hwm_after_pass']:.0f} MiB"
            )
            result["curve"] = curve.stop()
            if args.reports:
                out, first = workdir / "probe", 2 if args.early_at else 1
                result["first"] = ask(operator, out, first, signal.SIGUSR1, 600)
                time.sleep(args.settle)
                result["settled"] = ask(operator, out, first + 1, signal.SIGUSR2, 600)
        finally:
            done.set()
            operator.stop()
            ready.stop()
    return result


def mib(value: float) -> str:
    return f"{value:.1f}"


def summary(results: list[dict[str, Any]]) -> None:
    """One line per variant and N: the median peak (VmHWM after the pass and the scrapes) over the repeats."""
    print("\n| N | variant | operator env | peak MiB (median) | runs | before the scrapes | first pass s (median) |")
    print("|---|---|---|---|---|---|---|")
    keys: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for result in results:
        keys.setdefault((result["n"], result["label"]), []).append(result)
    for (n, label), runs in keys.items():
        peaks = [run["hwm_after_pass"] for run in runs]
        passes = [run["first_pass_s"] for run in runs]
        before = [run.get("hwm_before_scrapes", 0.0) for run in runs]
        env = " ".join(f"{k}={v}" for k, v in runs[0]["env"].items()) or "-"
        print(
            f"| {n:,} | {label} | {env} | {statistics.median(peaks):.1f} | "
            f"{', '.join(f'{p:.0f}' for p in peaks)} | {statistics.median(before):.1f} "
            f"| {statistics.median(passes):.1f} |"
        )


def show_parts(report: dict[str, Any]) -> None:
    engine = report.get("engine") or {}
    if engine.get("parts"):
        count = max(1, engine["entries"])
        print(f"\nThe engine's entries ({engine['entries']}), bytes per credential:\n")
        print("| part | bytes per credential |")
        print("|---|---|")
        total = 0
        for part, size in sorted(engine["parts"].items(), key=lambda kv: -kv[1]):
            total += size
            print(f"| {part} | {size / count:,.0f} |")
        print(f"| **all** | **{total / count:,.0f}** |")
        for label in ("redaction_index", "reader"):
            if label not in engine:
                continue
            print(f"| ({label.replace('_', ' ')}, per credential) | {engine[label] / count:,.0f} |")
    kopf = report.get("kopf") or {}
    if kopf.get("memories"):
        print(
            f"\nkopf's per-object memories: {kopf['memories']}, {kopf['memories_bytes'] / kopf['memories']:,.0f} "
            f"bytes each ({json.dumps(kopf.get('one_memory'))})"
        )


def show_tasks(label: str, report: dict[str, Any]) -> None:
    tasks = report.get("tasks") or {}
    if tasks:
        print(f"\nasyncio tasks {label}:\n")
        print("| coroutine | tasks | KiB (task, frame, what it reaches) | KiB (contexts) | context vars set |")
        print("|---|---|---|---|---|")
        for kind, info in tasks.items():
            names = ", ".join(f"{k} x{v}" for k, v in info.get("context_vars", {}).items())
            print(
                f"| {kind} | {info['count']} | {info['bytes'] / 1024:,.0f} | "
                f"{info.get('context_bytes', 0) / 1024:,.0f} | {names} |"
            )


def show(result: dict[str, Any]) -> None:
    n = result["n"]
    print(f"\n## N = {n:,} [{result['label']}] (first pass {result['first_pass_s']:.1f} s)\n")
    curve = result.get("curve") or []
    if curve:
        top = max(curve, key=lambda point: point[1])
        print(f"VmRSS over the first pass (s, MiB, verdicts); the highest at {top[0]:.1f} s: {top[1]:.0f} MiB\n")
        step = max(1, len(curve) // 24)
        print("  " + "; ".join(f"{t:.1f}s {rss:.0f} ({done})" for t, rss, done in curve[::step]))
    early = result.get("early")
    if early:
        status = early["status"]
        print(
            f"\nEarly report ({early.get('verdicts')} verdicts): VmRSS {status['VmRSS']:.0f} MiB, "
            f"VmHWM {status['VmHWM']:.0f} MiB"
        )
        show_parts(early)
        show_tasks("early", early)
    if "first" not in result:
        return
    first, settled = result["first"], result["settled"]
    for report in (first, settled):
        if "error" in report:
            print(f"\nThe probe failed: {report['error']}")
            return
    print("\n| when | VmRSS MiB | VmHWM MiB | RssAnon MiB | malloc in use / free MiB | threads |")
    print("|---|---|---|---|---|---|")
    print(f"| idle (socket up) | {mib(result['rss_idle'])} | | | | |")
    rows = [("after the pass and the scrapes", first), ("settled", settled)]
    if "after_gc" in settled:
        rows += [("settled, gc.collect()", settled["after_gc"]), ("settled, malloc_trim(0)", settled["after_trim"])]
    for label, report in rows:
        status, info = report["status"], report.get("mallinfo") or {}
        print(
            f"| {label} | {mib(status['VmRSS'])} | {mib(status['VmHWM'])} | {mib(status['RssAnon'])} "
            f"| {mib(info.get('in_use', 0))} / {mib(info.get('free', 0))} | {status.get('Threads', 0):.0f} |"
        )
    show_parts(settled)
    show_tasks("after the pass", first)
    show_tasks("settled", settled)
    print(f"\ngc objects settled: {settled.get('gc_objects')}; top types: {settled.get('census', [])[:12]}")
    traced = settled.get("tracemalloc")
    if traced:
        peak = traced.get("near_peak") or {}
        print(
            f"\ntracemalloc: traced now {traced['current_mib']:.1f} MiB, peak {traced['peak_mib']:.1f} MiB; "
            f"the snapshot near the peak ({peak.get('traced_mib', 0):.1f} MiB traced, VmRSS then "
            f"{(peak.get('status') or {}).get('VmRSS', 0):.0f}):"
        )
        for title, rows_ in (
            ("near the peak, by file", peak.get("by_file", [])),
            ("near the peak, by line", peak.get("by_line", [])),
            ("near the peak, by traceback", peak.get("by_trace", [])),
            ("settled, by file", traced.get("now_by_file", [])),
            ("settled, by line", traced.get("now_by_line", [])),
        ):
            print(f"\n{title}:\n")
            for where, size, count in rows_[:30]:
                print(f"  {size:8.2f} MiB {count:9,d}  {where}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000")
    parser.add_argument("--refresh-interval", default="30s")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between the two reports")
    parser.add_argument("--tracemalloc", type=int, default=0, help="frames to trace (0: off)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL or LABEL:NAME=VALUE,NAME=VALUE: the operator's env in one variant (repeatable; default: as is)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant (they alternate)")
    parser.add_argument("--reports", action="store_true", help="size what the operator holds (slow at 10,000)")
    parser.add_argument("--early-at", type=float, default=0.0, help="also size it this many seconds after the start")
    parser.add_argument("--json", help="also write the raw reports to this file")
    parser.add_argument("--deadline-base", type=float, default=60.0)
    parser.add_argument("--deadline-per-credential", type=float, default=0.1)
    args = parser.parse_args(argv)
    variants: list[tuple[str, dict[str, str]]] = []
    for spec in args.variant or ["as-is"]:
        label, _, assignments = spec.partition(":")
        variants.append((label, dict(item.split("=", 1) for item in assignments.split(",") if item)))
    from tests.support.awsemu import AwsEmulator
    from tests.support.awsproxy import FaultProxy
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.kubeproxy import KubeFaultProxy

    from connector_credentials.api.models import parse_duration

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale.index_moto_lookups()
    results = []
    try:
        with contextlib.ExitStack() as stack:
            plane = stack.enter_context(ControlPlane())
            aws = stack.enter_context(AwsEmulator())
            proxy = stack.enter_context(FaultProxy(aws.endpoint))
            cluster = Cluster(plane)
            cluster.apply_crds()
            kube_proxy = stack.enter_context(KubeFaultProxy(plane.url, plane.ssl_context()))
            env = scale.Env(
                plane, cluster, aws, proxy, kube_proxy, plane.ssl_context(), args, parse_duration(args.refresh_interval)
            )
            for size in args.sizes.split(","):
                n = int(size)
                scale.progress(f"N={n}: creating {n} secrets")
                arns = scale.create_secrets(proxy.endpoint, f"xpander/mem-{n}", n, args.threads)
                for _ in range(args.repeats):
                    for label, extra in variants:
                        results.append(measure(env, n, arns, label, extra))
    except Exception as exc:
        print(f"memory breakdown failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("Memory breakdown: the operator's peak (VmHWM) after a first pass over N credentials and 5 scrapes")
    summary(results)
    for result in results:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
