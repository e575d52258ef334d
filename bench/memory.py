"""The operator's memory (VmRSS and VmHWM) idle and with N credentials, for one or more installs.

Run from the repository root with the project's virtual environment (nothing runs it yet):

    .venv/bin/python bench/memory.py                                    # this venv's operator
    .venv/bin/python bench/memory.py --counts 0,1,100 --repeats 3 \\
        --operator before=/tmp/before/bin/connector-credentials \\
        --operator after=/tmp/after/bin/connector-credentials
    .venv/bin/python bench/memory.py --counts 0 --repeats 5 \
        --operator uvloop=/tmp/img/bin/connector-credentials --env uvloop:CCRED_EVENT_LOOP=uvloop \
        --operator asyncio=/tmp/img/bin/connector-credentials --env asyncio:CCRED_EVENT_LOOP=asyncio

Each ``--operator LABEL=PATH`` names a ``connector-credentials`` console script, typically of a
throwaway venv with ``pip install .`` (no extras): what a container image holds. Whether its
interpreter can import ``kubernetes`` is shown beside it, since kopf imports the official client
whenever it is installed. The venv of this script (``.venv``, with the test extra) has it. One
script may appear under two labels, each with its own ``--env LABEL:NAME=VALUE`` (e.g. the event loop).

One real kube-apiserver + etcd (``ControlPlane``) and one moto (``AwsEmulator``) serve every run.
Each run gets a fresh namespace with the shipped RBAC, N secrets and N ``ConnectorCredential``
objects, then starts ``connector-credentials run -n NS`` (production logging, the ServiceAccount's
TokenRequest token, TLS straight to the API server) and waits until ``/healthz`` answers ok and
every credential has a Ready condition (its verdict written). After ``--settle`` seconds it reads
``/proc/PID/status``. Runs of the installs alternate; the table shows the median of the repeats.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESOURCE = "connectors.xpander.ai/v1alpha1/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "Threads")


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures (and thread count) of /proc/PID/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0])
    return found


def has_kubernetes(script: str) -> bool:
    """Whether the console script's interpreter can import the official client."""
    python = Path(script).with_name("python")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('kubernetes') else 1)"
    return subprocess.run([str(python), "-c", probe], check=False).returncode == 0


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def wait_for(predicate: Any, timeout: float, what: str, operator: Any) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if operator.returncode is not None:
            raise RuntimeError(f"the operator exited ({operator.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


def one_run(
    kube: Any,
    aws: Any,
    workdir: Path,
    label: str,
    script: str,
    count: int,
    settle: float,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    from tests.support.awsemu import irsa_env
    from tests.support.runner import OperatorProcess

    from connector_credentials.client import CredentialClient

    namespace = f"mem-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(namespace)
    kube.install_operator_identity(namespace)
    for index in range(count):
        name = f"cred-{index:03d}"
        arn = aws.create_secret(f"xpander/{namespace}/{name}", string=f"mem-{uuid.uuid4().hex}")
        kube.create(
            RESOURCE,
            namespace,
            {
                "apiVersion": "connectors.xpander.ai/v1alpha1",
                "kind": "ConnectorCredential",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"secretArn": arn},
            },
        )
    rundir = workdir / namespace
    rundir.mkdir()
    sock = str(rundir / "s.sock")
    operator = OperatorProcess(
        namespace=namespace,
        kubeconfig=kube.write_kubeconfig(
            rundir / "kubeconfig", token=kube.service_account_token(namespace), namespace=namespace
        ),
        aws_env=irsa_env(rundir, aws.endpoint, role_arn=ROLE_ARN),
        socket_path=sock,
        extra_env={"CCRED_SHUTDOWN_DRAIN": "0", **(env or {})},
        log_path=rundir / "operator.log",
        home=rundir / "home",
        command=[script, "run", "-n", namespace],  # no --verbose: production logging
    )
    started = time.monotonic()
    operator.start()
    try:
        operator.wait_for_log("Serving credentials on", timeout=timeout)
        client = CredentialClient(sock, timeout=5)
        try:
            wait_for(client.healthy, timeout, "/healthz answered ok", operator)
        finally:
            client.close()

        def verdicts() -> bool:
            items = kube.list(RESOURCE, namespace)
            done = [
                item
                for item in items
                if any(c.get("type") == "Ready" for c in (item.get("status") or {}).get("conditions") or [])
            ]
            return len(done) == count

        wait_for(verdicts, timeout, f"a verdict for all {count} credentials", operator)
        ready_after = time.monotonic() - started
        time.sleep(settle)
        assert operator.pid is not None
        figures: dict[str, Any] = dict(proc_status(operator.pid))
        figures["ready_s"] = ready_after
        if count:
            ready = sum(
                1
                for item in kube.list(RESOURCE, namespace)
                for c in (item.get("status") or {}).get("conditions") or []
                if c.get("type") == "Ready" and c.get("status") == "True"
            )
            require(ready == count, f"{label}: only {ready} of {count} credentials are Ready=True")
        return figures
    except Exception:
        print(f"{label} with {count} credential(s) failed; operator output (tail):", file=sys.stderr)
        print(operator.output[-3000:], file=sys.stderr)
        raise
    finally:
        operator.stop()


def bench(args: argparse.Namespace) -> int:
    from tests.support.awsemu import AwsEmulator
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.runner import console_script

    operators: list[tuple[str, str]] = []
    for spec in args.operator or [f"this-venv={console_script()}"]:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--operator wants LABEL=PATH, not {spec!r}")
        operators.append((label, path))
    envs: dict[str, dict[str, str]] = {}
    for spec in args.env or []:
        label, _, assignment = spec.partition(":")
        name, equals, value = assignment.partition("=")
        if not equals or label not in dict(operators):
            raise SystemExit(f"--env wants LABEL:NAME=VALUE for a LABEL of --operator, not {spec!r}")
        envs.setdefault(label, {})[name] = value
    counts = [int(c) for c in args.counts.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="ccm-", dir="/tmp"))  # Unix socket paths must stay short
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        with ControlPlane() as plane, AwsEmulator() as aws:
            kube = Cluster(plane)
            kube.apply_crds()
            for rep in range(args.repeats):
                for count in counts:
                    order = operators if (rep + counts.index(count)) % 2 == 0 else operators[::-1]
                    for label, script in order:
                        figures = one_run(
                            kube, aws, workdir, label, script, count, args.settle, args.timeout, envs.get(label)
                        )
                        results.setdefault((label, count), []).append(figures)
                        if args.progress:
                            print(
                                f"  run {rep + 1} {label} n={count}: VmRSS {figures['VmRSS'] / 1024:.1f} MiB, "
                                f"VmHWM {figures['VmHWM'] / 1024:.1f} MiB, ready in {figures['ready_s']:.1f}s",
                                file=sys.stderr,
                                flush=True,
                            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, operators, counts, args, envs)
    return 0


def print_table(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    operators: list[tuple[str, str]],
    counts: list[int],
    args: argparse.Namespace,
    envs: dict[str, dict[str, str]],
) -> None:
    import platform

    print(
        f"connector-credentials memory: median of {args.repeats} run(s), read {args.settle:g}s after the last verdict; "
        f"Python {platform.python_version()} ({platform.machine()}), {platform.system()} {platform.release()}"
    )
    for label, script in operators:
        extra = "".join(f", {name}={value}" for name, value in envs.get(label, {}).items())
        print(f"  {label}: {script} (kubernetes importable: {'yes' if has_kubernetes(script) else 'no'}{extra})")
    header = (
        f"{'install':<14} | {'credentials':>11} | {'VmRSS MiB':>9} | {'VmHWM MiB':>9} | {'RssAnon MiB':>11} | "
        f"{'threads':>7} | {'ready s':>7}"
    )
    print(header)
    print("-" * len(header))
    for count in counts:
        for label, _ in operators:
            runs = results[(label, count)]

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(r[key] for r in runs))

            print(
                f"{label:<14} | {count:>11} | {med('VmRSS') / 1024:>9.1f} | {med('VmHWM') / 1024:>9.1f} | "
                f"{med('RssAnon') / 1024:>11.1f} | {med('Threads'):>7.0f} | {med('ready_s'):>7.1f}"
            )
    if len(operators) > 1:
        (first, _), *others = operators
        print()
        for count in counts:
            a = statistics.median(r["VmRSS"] for r in results[(first, count)]) / 1024
            for other, _ in others:
                b = statistics.median(r["VmRSS"] for r in results[(other, count)]) / 1024
                print(f"{count:>4} credential(s): {other} - {first} = {b - a:+.1f} MiB VmRSS ({(b - a) / a:+.0%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--operator",
        action="append",
        metavar="LABEL=PATH",
        help="a connector-credentials console script to measure (repeatable; default: this venv's)",
    )
    parser.add_argument(
        "--env",
        action="append",
        metavar="LABEL:NAME=VALUE",
        help="an environment variable for the runs of one --operator label (repeatable)",
    )
    parser.add_argument("--counts", default="0,1,100", help="credentials per run, comma-separated (default 0,1,100)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; medians shown (default 1)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between the last verdict and the reading")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for start-up and verdicts")
    parser.add_argument("--progress", action="store_true", help="print every run to stderr as it finishes")
    return bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
