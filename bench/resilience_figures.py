"""Resilience figures: AWS calls under sustained throttling, and time to recover after an outage.

Run from the repository root with the project's venv (not collected by pytest)::

    .venv/bin/python bench/resilience_figures.py

It starts its own control plane (kube-apiserver + etcd), moto and fault proxy (127.0.0.1 only), runs the operator's
console script against them exactly as the integration tests do, and prints:

1. reads (a GetSecretValue, or a BatchGetSecretValue naming the secret) per credential while 20 credentials
   are throttled from the start for 60 s,
   with the default backoff (1 s doubling to 300 s), for CCRED_AWS_MAX_ATTEMPTS=1 and the default 2;
2. seconds until a verified fleet of 20 is AccessVerified again after a 20 s outage (5xx on every
   read; refreshInterval 5s, CCRED_MAX_STALENESS 5s), with the default backoff cap and a 5 s cap.

Both configurations of each measurement run side by side (own namespace, own operator); the
whole script takes about two and a half minutes and is bounded by explicit deadlines.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts bench/ on sys.path, not the repository root

from tests.integration.conftest import RESOURCE, World  # noqa: E402
from tests.support.awsemu import AwsEmulator  # noqa: E402
from tests.support.awsproxy import FaultProxy  # noqa: E402
from tests.support.controlplane import ControlPlane  # noqa: E402
from tests.support.kube import Cluster  # noqa: E402
from tests.support.kubeproxy import KubeFaultProxy  # noqa: E402


@dataclass
class Kube:
    cluster: Cluster
    proxy: KubeFaultProxy


FLEET = 20
THROTTLE_SECONDS = 60.0
OUTAGE_SECONDS = 20.0
RECOVERY_DEADLINE = 90.0


@contextmanager
def worlds(kube: Kube, aws: AwsEmulator, proxy: FaultProxy, count: int) -> Iterator[list[World]]:
    """``count`` worlds (namespace, workdir, operators) that are cleaned up whatever happens."""
    made: list[World] = []
    try:
        for _ in range(count):
            made.append(
                World(kube.cluster, kube.proxy, aws, proxy, Path(tempfile.mkdtemp(prefix="ccred-bench-", dir="/tmp")))
            )
        yield made
    finally:
        for world in made:
            for process in world.operators:
                process.stop()
            shutil.rmtree(world.workdir, ignore_errors=True)


def declare_fleet(world: World, spec: dict[str, Any]) -> list[str]:
    names = [f"c{i:02d}" for i in range(FLEET)]
    for name in names:
        world.apply(name, {"secretArn": world.secret(name), **spec})
    return names


def readiness(world: World) -> dict[str, tuple[str, str]]:
    """(status, reason) of every credential of the world, read as the admin."""
    found: dict[str, tuple[str, str]] = {}
    for obj in world.cluster.list(RESOURCE, world.namespace):
        meta = obj.get("metadata") or {}
        if meta.get("namespace") != world.namespace:
            continue
        for condition in (obj.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Ready":
                found[meta["name"]] = (str(condition.get("status")), str(condition.get("reason")))
    return found


def wait_for(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def calls_per_credential(world: World, names: list[str], start: float, end: float) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    keys = {name: f"{world.prefix}/{name}-" for name in names}
    for seen in world.proxy.seen:
        # A read is a GetSecretValue or a BatchGetSecretValue that names the secret.
        if seen.action not in ("GetSecretValue", "BatchGetSecretValue") or not start <= seen.at < end:
            continue
        for name, key in keys.items():
            if any(key in sid for sid in seen.secret_ids):
                counts[name] += 1
    return counts


def spread(values: list[float]) -> str:
    return f"min {min(values):g} / median {statistics.median(values):g} / max {max(values):g}"


def throttling(kube: Kube, aws: AwsEmulator, proxy: FaultProxy) -> None:
    print(f"(1) {FLEET} credentials throttled from the start for {THROTTLE_SECONDS:g} s, default backoff")
    configs = {"CCRED_AWS_MAX_ATTEMPTS=1": {"CCRED_AWS_MAX_ATTEMPTS": "1"}, "CCRED_AWS_MAX_ATTEMPTS=2 (default)": {}}
    with worlds(kube, aws, proxy, len(configs)) as made:
        fleets = []
        for world in made:
            fleets.append(declare_fleet(world, {}))  # default refreshInterval (5m)
            proxy.throttle(secret_id_contains=f"{world.prefix}/")
        starts = []
        for world, env in zip(made, configs.values(), strict=True):
            world.start_operator(extra_env=env)
            starts.append(time.monotonic())
        ends = [start + THROTTLE_SECONDS for start in starts]
        time.sleep(max(0.0, max(ends) - time.monotonic()))
        proxy.clear()
        for label, world, names, start, end in zip(configs, made, fleets, starts, ends, strict=True):
            window = end - start
            calls = calls_per_credential(world, names, start, end)
            output = world.operators[0].output
            checks = [output.count(f"{world.namespace}/{name}: Throttled") for name in names]
            total = sum(calls.values())
            print(f"  {label}: over {window:.1f} s")
            print(f"    reads (GetSecretValue or in a batch) per credential: {spread(list(calls.values()))}")
            print(f"    operator checks per credential:      {spread([float(c) for c in checks])}")
            print(
                f"    fleet: {total} calls, {total / window:.2f} calls/s ({total / window / FLEET:.3f} per credential)"
            )
            print(f"    calls in the last 30 s: {sum(calls_per_credential(world, names, end - 30, end).values())}")


def recovery(kube: Kube, aws: AwsEmulator, proxy: FaultProxy) -> None:
    print(f"(2) {FLEET} verified credentials, {OUTAGE_SECONDS:g} s of 5xx on every read, then recovery")
    print("    (refreshInterval 5s, CCRED_MAX_STALENESS 5s, backoff base 1 s)")
    configs = {"default cap (300 s)": {}, "CCRED_BACKOFF_CAP=5": {"CCRED_BACKOFF_CAP": "5"}}
    with worlds(kube, aws, proxy, len(configs)) as made:
        fleets = [declare_fleet(world, {"refreshInterval": "5s"}) for world in made]
        for world, env in zip(made, configs.values(), strict=True):
            world.start_operator(extra_env={"CCRED_MAX_STALENESS": "5s", **env})
        deadline = time.monotonic() + 30
        for world, names in zip(made, fleets, strict=True):
            wait_for(
                lambda w=world, n=names: all(readiness(w).get(x) == ("True", "AccessVerified") for x in n),
                deadline,
                "the fleet to be verified",
            )
        rules = [proxy.fail_5xx(secret_id_contains=f"{world.prefix}/") for world in made]
        failed_at = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        down = [sum(1 for s in readiness(world).values() if s[0] == "False") for world in made]
        for rule in rules:
            rule.times = 0  # the outage ends
        cleared = time.monotonic()
        recovered: list[dict[str, float]] = [{} for _ in made]
        deadline = cleared + RECOVERY_DEADLINE
        while any(len(r) < FLEET for r in recovered) and time.monotonic() < deadline:
            now = time.monotonic()
            for world, seen in zip(made, recovered, strict=True):
                for name, state in readiness(world).items():
                    if state == ("True", "AccessVerified") and name not in seen:
                        seen[name] = now - cleared
            time.sleep(0.1)
        for label, world, names, seen, count in zip(configs, made, fleets, recovered, down, strict=True):
            calls = calls_per_credential(world, names, failed_at, cleared)
            print(f"  {label}: {count}/{FLEET} were Ready=False when the outage ended")
            if len(seen) < FLEET:
                print(f"    only {len(seen)}/{FLEET} recovered within {RECOVERY_DEADLINE:g} s")
            if seen:
                print(f"    seconds to AccessVerified after the outage: {spread([round(v, 1) for v in seen.values()])}")
            print(f"    reads per credential during the outage: {spread(list(calls.values()))}")
        proxy.clear()


def main() -> None:
    began = time.monotonic()
    with ControlPlane() as plane, AwsEmulator() as aws, FaultProxy(aws.endpoint) as proxy:
        cluster = Cluster(plane)
        cluster.apply_crds()
        with KubeFaultProxy(plane.url, plane.ssl_context()) as kube_proxy:
            kube = Kube(cluster, kube_proxy)
            throttling(kube, aws, proxy)
            recovery(kube, aws, proxy)
    print(f"done in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
