"""Rotation benchmark: how long a new secret version takes to reach the controller's watch stream
on both replicas, through the rotation queue and, as the baseline of the same run, by polling.

Run from the repository root with the project's venv (``make bench`` runs it; not collected by pytest)::

    .venv/bin/python bench/rotation.py [--rotations 20] [--poll-interval 30s]

It starts its own control plane (kube-apiserver + etcd), moto (Secrets Manager, STS and SQS) and the
AWS fault proxy, all on 127.0.0.1, and runs the operator's console script as the integration tests do:

1. **Events**: two replicas in one namespace, both long-polling one SQS queue
   (``CCRED_ROTATION_QUEUE_URL``), one credential with ``refreshInterval: 1h``, and a
   ``connector-credentials`` client watching it on each replica's socket (``CredentialClient.watch``).
   Each rotation puts a new version in moto and sends the ``Secret Label Updated`` event an
   EventBridge rule would; the time is from the event's sending until each replica's watch delivers
   the new value. The rotations run one after the other, 2 s apart (more than
   ``CCRED_MIN_REFRESH_GAP``, as real rotations are).
2. **Polling** (the baseline): two more replicas, no queue, one credential per rotation with
   ``refreshInterval`` ``--poll-interval``, each rotated at its own moment spread over one interval
   (so that the rotations meet the refresh cycle at every phase, as real rotations do); the time is
   from the new version's creation until each replica's watch delivers it.

Prints p50 and max per path and per replica, and the ratio. Every wait has a deadline; every process
is stopped whatever happens. See bench/README.md (Rotation).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts bench/ on sys.path, not the repository root

from tests.integration.conftest import World  # noqa: E402
from tests.support.awsemu import AwsEmulator, label_moved  # noqa: E402
from tests.support.awsproxy import FaultProxy  # noqa: E402
from tests.support.controlplane import ControlPlane  # noqa: E402
from tests.support.kube import Cluster  # noqa: E402
from tests.support.kubeproxy import KubeFaultProxy  # noqa: E402
from tests.support.runner import wait_until  # noqa: E402

from connector_credentials.api.models import parse_duration  # noqa: E402
from connector_credentials.client import Credential, CredentialClient  # noqa: E402

REPLICAS = 2
#: Seconds between one rotation's delivery and the next rotation (more than CCRED_MIN_REFRESH_GAP).
SPACING = 2.0


class Watcher(threading.Thread):
    """Watches one credential on one replica's socket; records when each value first arrived."""

    def __init__(self, socket_path: str, namespace: str, name: str) -> None:
        super().__init__(daemon=True, name=f"watch-{name}")
        self.client = CredentialClient(socket_path, timeout=15)
        self.stream = self.client.watch(namespace, name)
        self.arrived: dict[str, float] = {}

    def run(self) -> None:
        for item in self.stream:
            if isinstance(item, Credential) and item.value not in self.arrived:
                self.arrived[item.value] = time.monotonic()

    def stop(self) -> None:
        self.stream.close()
        self.client.close()


@contextmanager
def world(cluster: Cluster, kube_proxy: KubeFaultProxy, aws: AwsEmulator, proxy: FaultProxy) -> Iterator[World]:
    made = World(cluster, kube_proxy, aws, proxy, Path(tempfile.mkdtemp(prefix="ccred-rot-", dir="/tmp")))
    try:
        yield made
    finally:
        for process in made.operators:
            process.stop()
        shutil.rmtree(made.workdir, ignore_errors=True)


def replicas(place: World, **env: str) -> list[str]:
    """Start the replicas (production logging); their socket paths."""
    paths = []
    for index in range(REPLICAS):
        path = str(place.workdir / f"r{index}.sock")
        place.start_operator(extra_env=dict(env), socket_path=path, args=("-n", place.namespace))
        paths.append(path)
    return paths


def watching(stack: ExitStack, paths: list[str], namespace: str, name: str) -> list[Watcher]:
    watchers = [Watcher(path, namespace, name) for path in paths]
    for watcher in watchers:
        watcher.start()
        stack.callback(watcher.stop)
    return watchers


def events(place: World, rotations: int) -> list[list[float]]:
    """Per replica: the seconds from each event's sending to its value in that replica's watch."""
    queue = place.aws.create_queue(f"rotations-{place.namespace}")
    first = place.canary("first")
    arn = place.secret("slack", string=first)
    place.apply("slack", {"secretArn": arn, "refreshInterval": "1h"})
    paths = replicas(place, CCRED_ROTATION_QUEUE_URL=queue)
    took: list[list[float]] = [[] for _ in paths]
    with ExitStack() as stack:
        watchers = watching(stack, paths, place.namespace, "slack")
        wait_until(lambda: all(first in w.arrived for w in watchers), timeout=60, message="the first value")
        for _ in range(rotations):
            # Real rotations are minutes apart: each comes after CCRED_MIN_REFRESH_GAP (1 s) since
            # the last read, which would otherwise hold the event's read back until the gap ends.
            settled = time.monotonic() + SPACING
            wait_until(lambda at=settled: time.monotonic() >= at, timeout=SPACING + 1, message="the spacing")
            value = place.canary("rotated")
            version = place.aws.put_value(arn, string=value)
            sent = time.monotonic()
            place.aws.send(queue, label_moved(arn, version))
            wait_until(lambda v=value: all(v in w.arrived for w in watchers), timeout=30, message="a rotation")
            for index, watcher in enumerate(watchers):
                took[index].append(watcher.arrived[value] - sent)
    return took


def polling(place: World, rotations: int, interval: float) -> list[list[float]]:
    """Per replica: the seconds from each new version to its value in that replica's watch."""
    names = [f"p{i:02d}" for i in range(rotations)]
    firsts = {name: place.canary(name) for name in names}
    arns = {name: place.secret(name, string=firsts[name]) for name in names}
    for name in names:
        place.apply(name, {"secretArn": arns[name], "refreshInterval": f"{interval:g}s"})
    paths = replicas(place)
    took: list[list[float]] = [[] for _ in paths]
    with ExitStack() as stack:
        watchers = {name: watching(stack, paths, place.namespace, name) for name in names}
        wait_until(
            lambda: all(firsts[n] in w.arrived for n in names for w in watchers[n]), timeout=90, message="firsts"
        )
        start, rotated = time.monotonic(), {}
        for index, name in enumerate(names):
            at = start + index * interval / len(names)
            wait_until(lambda at=at: time.monotonic() >= at, timeout=interval + 5, message="the next rotation")
            value = place.canary(name)
            place.aws.put_value(arns[name], string=value)
            rotated[name] = (value, time.monotonic())
        wait_until(
            lambda: all(rotated[n][0] in w.arrived for n in names for w in watchers[n]),
            timeout=2 * interval + 30,
            message="every polled rotation",
        )
        for name in names:
            value, at = rotated[name]
            for index, watcher in enumerate(watchers[name]):
                took[index].append(watcher.arrived[value] - at)
    return took


def row(label: str, took: list[list[float]]) -> tuple[str, float, float, list[str]]:
    every = [t for per_replica in took for t in per_replica]
    per = [f"r{i}: {statistics.median(t):.2f} / {max(t):.2f}" for i, t in enumerate(took)]
    return label, statistics.median(every), max(every), per


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--poll-interval", default="30s", help="refreshInterval of the polling baseline")
    args = parser.parse_args(argv)
    interval = parse_duration(args.poll_interval)
    began = time.monotonic()
    with ControlPlane() as plane, AwsEmulator() as aws, FaultProxy(aws.endpoint) as proxy:
        cluster = Cluster(plane)
        cluster.apply_crds()
        with KubeFaultProxy(plane.url, plane.ssl_context()) as kube_proxy:
            with world(cluster, kube_proxy, aws, proxy) as place:
                queued = events(place, args.rotations)
            with world(cluster, kube_proxy, aws, proxy) as place:
                polled = polling(place, args.rotations, interval)
    rows = [row("events (SQS queue)", queued), row(f"polling ({args.poll_interval})", polled)]
    print(f"\nRotation to the watch streams of {REPLICAS} replicas, {args.rotations} rotations per path (seconds)")
    print(f"{'path':<22} {'p50':>7} {'max':>7}   per replica (p50 / max)")
    for label, p50, most, per in rows:
        print(f"{label:<22} {p50:>7.2f} {most:>7.2f}   {', '.join(per)}")
    print(f"events vs polling: p50 {rows[1][1] / rows[0][1]:.0f}x sooner, max {rows[1][2] / rows[0][2]:.0f}x sooner")
    print(f"done in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
