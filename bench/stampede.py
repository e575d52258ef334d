"""The start-up stampede, a part of ``bench/scale.py``: a controller that asks for every credential at once.

N credentials are declared; the operator starts; as soon as ``/healthz`` answers 200 the
controller reads all N through the socket (the client library), twice, each time against a
freshly started operator: on 64 keep-alive connections (each reading its share in turn), and
with all N reads in flight at once (on N connections: CCRED_MAX_CONNECTIONS is raised to fit).
AWS answers every call 50 ms late (a rule at the AWS proxy).

Measured: every answer's status; p50 and max latency; the time from ``/healthz`` to the last
answer, against two bare floors of the same run, with AWS as slow: the I/O of a start (scale.py's
floor: ``ceil(N/20)`` ``BatchGetSecretValue`` calls of 20 and N status patches, on 8 threads) and,
stricter, its reads alone; Secrets Manager calls from the operator's start to the last answer.
The goals: every answer 200, the last within 2x the floor, calls at most ``ceil(N/20) + 10``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How late AWS answers every call during the stampede.
AWS_LATENCY = 0.05
CONNECTIONS = 64


@dataclass
class Stampede:
    mode: str
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    #: From /healthz answering 200 to the last answer.
    last: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)

    def cell(self, n: int, floors: tuple[float, float]) -> str:
        """``p50 / last s (x the start's floor / x the reads' floor), calls / limit``, and answers not 200."""
        if not self.latencies:
            return "—"
        bad = sum(count for status, count in self.statuses.items() if status != "200")
        calls = sum(self.calls.values())
        start, reads = floors
        text = (
            f"{statistics.median(self.latencies):.2f} / {self.last:.2f} s "
            f"({self.last / start:.1f}x / {self.last / reads:.1f}x), {calls} / {math.ceil(n / 20) + 10} calls"
        )
        return text + (f", {bad} not 200" if bad else "")


async def _read_all(socket_path: str, namespace: str, names: list[str], mode: str, result: Stampede) -> None:
    from connector_credentials.client import AsyncCredentialClient, CredentialError

    async def one(client: Any, name: str) -> None:
        began = time.perf_counter()
        try:
            await client.get(namespace, name)
            result.statuses["200"] += 1
        except CredentialError as exc:
            result.statuses[str(exc.status or exc.reason)] += 1
        result.latencies.append(time.perf_counter() - began)

    async def share(names: list[str]) -> None:
        async with AsyncCredentialClient(socket_path, timeout=60) as client:
            for name in names:  # in turn: one keep-alive connection
                await one(client, name)

    if mode == "all":
        async with AsyncCredentialClient(socket_path, timeout=60) as client:
            await asyncio.gather(*(one(client, name) for name in names))
    else:
        await asyncio.gather(*(share(names[i::CONNECTIONS]) for i in range(CONNECTIONS)))


def measure(
    scale: Any, env: Any, namespace: str, token: str, workdir: Path, names: list[str], deadline: float, *, mode: str
) -> Stampede:
    """One stampede against a freshly started operator (``scale``: bench/scale.py, for its helpers)."""
    result = Stampede(mode)
    slow = env.proxy.latency(AWS_LATENCY)
    # All N at once are more connections than the default CCRED_MAX_CONNECTIONS (256): as a controller
    # that opens that many would, the limit is raised (else connections past it push out idle ones).
    room = {"CCRED_MAX_CONNECTIONS": str(max(256, 2 * len(names)))} if mode == "all" else {}
    operator = scale.start_operator(env, namespace, token, workdir, **room)
    socket_path = str(workdir / "c.sock")
    try:
        t0 = time.monotonic()
        operator.start()
        t_healthy = scale.wait_for(
            lambda: (scale.healthz_status(socket_path, 0.5) == 200 and time.monotonic()) or not operator.running,
            t0 + 60,
            "/healthz to answer 200",
            0.01,
        )
        scale.check_operator(operator, "start-up")
        asyncio.run(asyncio.wait_for(_read_all(socket_path, namespace, names, mode, result), deadline - t_healthy))
        t_end = time.monotonic()
        result.last = t_end - t_healthy
        result.calls = Counter(
            str(seen.action) for seen in scale.aws_calls(env, t0, t_end) if seen.action in scale.SM_ACTIONS
        )
        scale.check_operator(operator, "the stampede")
    finally:
        slow.times = 0
        operator.stop()
    return result


def floors(
    scale: Any, env: Any, workdir: Path, token: str, namespace: str, names: list[str], arns: list[str], budget: float
) -> tuple[float, float]:
    """The bare floors with AWS as slow as in the stampede, on 8 threads: a start's I/O (the reads and
    N status patches), and the reads alone."""
    slow = env.proxy.latency(AWS_LATENCY)
    try:
        start, _ = scale.run_floor(
            workdir, env.proxy.endpoint, env.kube_proxy.url, token, namespace, names, arns, 8, budget
        )
        reads, _ = scale.run_floor(
            workdir, env.proxy.endpoint, env.kube_proxy.url, token, namespace, names, arns, 8, budget, patches=False
        )
    finally:
        slow.times = 0
    return start, reads
