"""Resilience: AWS faults, Kubernetes API faults, restarts and two replicas, end to end.

The operator runs as a subprocess against a real API server and moto, each behind a fault proxy, with small
settings (refreshInterval 5s, CCRED_MAX_STALENESS 5s, backoff 0.2 s doubling to 2 s) so that a
staleness window, a backoff ladder and a recovery fit in seconds. A background recorder keeps
every change of the Ready condition, so "nothing flaps" is checked on the whole history and
not only on the final state.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self

import pytest

from connector_credentials.client import CredentialClient, CredentialUnavailable
from tests.integration.conftest import RESOURCE, World
from tests.support.awsbatch import READ_ACTIONS
from tests.support.awsproxy import FaultProxy
from tests.support.runner import wait_until

INTERVAL = 5.0
STALENESS = 5.0
BACKOFF_BASE = 0.2
BACKOFF_CAP = 2.0
SPEC_INTERVAL = "5s"
FAST = {
    "CCRED_DEFAULT_REFRESH_INTERVAL": SPEC_INTERVAL,
    "CCRED_MAX_STALENESS": "5s",
    "CCRED_BACKOFF_BASE": str(BACKOFF_BASE),
    "CCRED_BACKOFF_CAP": str(BACKOFF_CAP),
    "CCRED_AWS_CONNECT_TIMEOUT": "1",
    "CCRED_AWS_READ_TIMEOUT": "1",
    # GetCallerIdentity on every check, so that STS hiccups are on the path of every refresh.
    "CCRED_IDENTITY_CACHE_SECONDS": "0",
}

State = tuple[str, str, str, str] | None  # (status, reason, message, lastTransitionTime)


def _state(condition: dict[str, Any] | None) -> State:
    if condition is None:
        return None
    return (
        str(condition.get("status")),
        str(condition.get("reason")),
        str(condition.get("message")),
        str(condition.get("lastTransitionTime")),
    )


def _ready_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return dict(condition)
    return None


class Timeline:
    """Polls the Ready condition of some credentials (as the admin) and keeps every change."""

    def __init__(self, world: World, names: Iterable[str], period: float = 0.1) -> None:
        self.world = world
        self.names = list(names)
        self.period = period
        self.changes: dict[str, list[tuple[float, State]]] = {name: [] for name in self.names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-timeline", daemon=True)
        self.polls = 0  # snapshots taken so far

    def snapshot(self) -> dict[str, State]:
        found: dict[str, State] = {}
        for obj in self.world.cluster.list(RESOURCE, self.world.namespace):
            meta = obj.get("metadata") or {}
            if meta.get("name") in self.changes:
                found[meta["name"]] = _state(_ready_of(obj))
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.snapshot()
            now = time.monotonic()
            for name in self.names:
                series = self.changes[name]
                state = snapshot.get(name)
                if not series or series[-1][1] != state:
                    series.append((now, state))
            self.polls += 1
            self._stop.wait(self.period)

    def catch_up(self, polls: int = 2) -> None:
        """Wait until snapshots begun after this call are recorded: what the API says now is in."""
        target = self.polls + polls
        wait_until(lambda: self.polls >= target, timeout=10, message="the timeline stopped recording")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(10)

    def states(self, name: str, since: float = 0.0) -> list[State]:
        series = list(self.changes[name])
        before = [state for at, state in series if at < since][-1:]
        return before + [state for at, state in series if at >= since]

    def first(self, name: str, predicate: Callable[[State], bool], since: float = 0.0) -> float | None:
        return next((at for at, state in list(self.changes[name]) if at >= since and predicate(state)), None)


def assert_no_flapping(states: list[State], name: str) -> None:
    """lastTransitionTime moves only with the status, and only when it really changes."""
    for before, after in itertools.pairwise(states):
        if before is None or after is None:
            continue
        if before[0] == after[0]:
            assert before[3] == after[3], f"{name}: lastTransitionTime moved without a transition: {before} -> {after}"
        else:  # RFC 3339 in UTC to the second: a transition within the same second keeps the same text
            assert after[3] >= before[3], f"{name}: lastTransitionTime went back: {before} -> {after}"


def status_transitions(states: list[State]) -> list[str]:
    """The successive statuses, with repeats collapsed."""
    result: list[str] = []
    for state in states:
        if state is not None and (not result or result[-1] != state[0]):
            result.append(state[0])
    return result


def events_of(world: World, name: str) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in world.events(name)]


def calls_between(world: World, secret: str, start: float, end: float = float("inf")) -> int:
    """GetSecretValue requests that reached the proxy for one credential's secret in [start, end)."""
    key = f"{world.prefix}/{secret}-"
    return sum(
        1
        for seen in world.proxy.seen
        if seen.action in READ_ACTIONS and start <= seen.at < end and any(key in sid for sid in seen.secret_ids)
    )


def status_patches(world: World, name: str | None = None) -> int:
    """PATCH requests of the operator(s) to the status subresource (accepted or not)."""
    pattern = re.compile(rf"/namespaces/{world.namespace}/connectorcredentials/{name or '[^/]+'}/status$")
    return len(world.kube.requests("PATCH", pattern))


def max_calls_under_backoff(window: float, attempts: int = 2, extra_checks: int = 0) -> int:
    """An upper bound of the AWS calls one credential may make in ``window`` seconds of failures.

    Each retry waits at least half of min(cap, base * 2**(n-1)): 0.1, 0.2, 0.4, 0.8, then 1 s;
    add one check at the staleness limit, one in flight, and the checks socket reads started.
    """
    elapsed, checks, step = 0.0, 0, 1
    while elapsed < window:
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (step - 1)) / 2
        elapsed += delay
        checks += 1
        step += 1
    return attempts * (checks + 2 + extra_checks)


def read_all(client: CredentialClient, namespace: str, names: Iterable[str]) -> dict[str, Any]:
    """Read credentials concurrently (a read may wait for AWS up to CCRED_SERVE_WAIT); value or error."""

    def one(name: str) -> Any:
        try:
            return client.get(namespace, name).value
        except CredentialUnavailable as exc:
            return exc

    names = list(names)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


# --------------------------------------------------------------------------- AWS faults


def test_aws_faults_served_within_staleness_then_reported_then_recovered(world: World) -> None:
    """Throttling, 5xx, resets, timeouts, an STS hiccup and a revoked permission, in one operator."""
    proxy = world.proxy
    transient = {  # credential -> the reason its fault must produce
        "throttled": "Throttled",  # ThrottlingException
        "unavailable": "AWSUnavailable",  # HTTP 500 InternalServiceError
        "reset": "AWSUnavailable",  # TCP reset instead of an answer
        "slow": "AWSUnavailable",  # no answer within the read timeout
    }
    names = [*transient, "steady", "revoked"]
    fleet = [f"fleet{i}" for i in range(6)]
    for name in [*names, *fleet]:
        world.apply(name, {"secretArn": world.secret(name), "refreshInterval": SPEC_INTERVAL})

    def sid(name: str) -> str:
        return f"{world.prefix}/{name}-"

    # The fleet is throttled from the start: never verified, it must back off, not hammer.
    proxy.throttle(secret_id_contains=f"{world.prefix}/fleet")
    started = time.monotonic()
    # One call per secret: a reset or a timeout hits a whole call, and this test gives each
    # credential a fault of its own (test_batching.py covers a batch that fails as a whole).
    world.start_operator(extra_env={**FAST, "CCRED_BATCH_READS": "false"})
    for name in names:
        world.wait_reason(name, "AccessVerified")
    for name in fleet:
        world.wait_reason(name, "Throttled")
    initial = {name: world.ready(name) for name in names}
    ns = world.namespace

    with world.client() as client, Timeline(world, [*names, *fleet]) as timeline:
        # Verify everything now: the staleness window of every value starts here.
        verified_from = time.monotonic()
        values = {name: client.get(ns, name, refresh=True).value for name in names}
        verified_until = time.monotonic()

        # Phase 1: an STS hiccup (GetCallerIdentity throttled) hits every scheduled check.
        sts = proxy.throttle(action="GetCallerIdentity")
        wait_until(
            lambda: all("failed transiently (Throttled)" in (world.ready(n) or {}).get("message", "") for n in names),
            timeout=INTERVAL * 1.1 + 3,
            message="the scheduled checks during the STS hiccup were not reported in the message",
        )
        for name in names:
            condition = world.ready(name)
            assert condition is not None
            assert (condition["status"], condition["reason"]) == ("True", "AccessVerified"), name
            assert condition["lastTransitionTime"] == initial[name]["lastTransitionTime"], name  # type: ignore[index]

        # Phase 2: the hiccup ends; per-secret faults start; one permission is revoked.
        sts.times = 0
        proxy.throttle(secret_id_contains=sid("throttled"))
        proxy.fail_5xx(secret_id_contains=sid("unavailable"))
        proxy.reset_connection(action="GetSecretValue", secret_id_contains=sid("reset"))
        proxy.latency(3.0, action="GetSecretValue", secret_id_contains=sid("slow"))
        proxy.deny(secret_id_contains=sid("revoked"))
        faults_from = time.monotonic()

        # Within staleness: the verified values are still served, Ready stays True.
        served = read_all(client, ns, transient)
        assert time.monotonic() < verified_from + INTERVAL + STALENESS, "too slow to observe the staleness window"
        assert served == {name: values[name] for name in transient}, served
        # The STS hiccup is over for the healthy one: back to the plain verified message, same transition.
        wait_until(
            lambda: world.ready("steady") == initial["steady"],
            timeout=BACKOFF_CAP + 3,
            message="steady did not recover from the STS hiccup",
        )
        # A permanent answer stops serving at once (502) and is not retried with backoff.
        world.wait_reason("revoked", "AccessDenied", timeout=BACKOFF_CAP + 3)
        denied_at = time.monotonic()
        with pytest.raises(CredentialUnavailable) as denied:
            client.get(ns, "revoked")
        assert denied.value.status == 502
        assert denied.value.reason == "AccessDenied"

        # While it lasted, each failed check was told in the message of a condition still True.
        for name, reason in transient.items():
            wait_until(
                lambda n=name, r=reason: timeline.first(
                    n,
                    lambda s: s is not None and s[:2] == ("True", "AccessVerified") and f"transiently ({r})" in s[2],
                    since=faults_from,
                ),
                timeout=BACKOFF_CAP + 3,
                message=f"{name}: the failed check was never in the message",
            )

        # Past the staleness limit: Ready=False with the transient reason, 503 with Retry-After.
        for name, reason in transient.items():
            condition = world.wait_reason(
                name, reason, timeout=verified_until + INTERVAL + STALENESS + 6 - time.monotonic()
            )
            assert condition["status"] == "False"
            went_false = wait_until(
                lambda n=name: timeline.first(n, lambda s: s is not None and s[0] == "False"), timeout=2
            )
            assert went_false >= verified_from + INTERVAL + STALENESS, (
                f"{name} stopped being Ready {verified_from + INTERVAL + STALENESS - went_false:.2f}s early"
            )
        unavailable = read_all(client, ns, transient)
        for name, reason in transient.items():
            answer = unavailable[name]
            assert isinstance(answer, CredentialUnavailable), (name, "still served past the staleness limit")
            assert (answer.status, answer.reason) == (503, reason), (name, str(answer))
            assert answer.retry_after is not None and 1 <= answer.retry_after <= BACKOFF_CAP + 2, answer.retry_after
        served_steady = client.get(ns, "steady")
        assert served_steady.value == values["steady"]

        # Bounded calls while failing: the backoff, not a loop.
        cleared_at = time.monotonic()
        window = cleared_at - faults_from
        for name in ("throttled", "unavailable", "reset"):
            calls = calls_between(world, name, faults_from, cleared_at)
            assert 2 <= calls <= max_calls_under_backoff(window, extra_checks=2), (name, calls, window)
        revoked_calls = calls_between(world, "revoked", faults_from, cleared_at)
        assert revoked_calls <= 1 + int((cleared_at - denied_at) / (INTERVAL * 0.9)) + 1, revoked_calls
        fleet_window = cleared_at - started
        fleet_calls = {name: calls_between(world, name, started, cleared_at) for name in fleet}
        assert all(calls <= max_calls_under_backoff(fleet_window) for calls in fleet_calls.values()), (
            fleet_calls,
            fleet_window,
        )
        assert not _synchronized(world, fleet, cleared_at - 8.0, cleared_at), "the fleet retries in lockstep"

        # Recovery without a restart.
        proxy.clear()
        for name in [*transient, *fleet]:
            world.wait_reason(name, "AccessVerified", timeout=BACKOFF_CAP + 5)
        world.wait_reason("revoked", "AccessVerified", timeout=INTERVAL * 1.1 + 3)
        recovered = read_all(client, ns, names)
        assert recovered == values
        timeline.catch_up()

    for name in names:
        states = timeline.states(name)
        assert_no_flapping(states, name)
    for name, reason in transient.items():
        assert status_transitions(timeline.states(name)) == ["True", "False", "True"], name
        assert events_of(world, name) == [
            ("Normal", "AccessVerified"),
            ("Warning", reason),
            ("Normal", "AccessVerified"),
        ], name
    assert status_transitions(timeline.states("revoked")) == ["True", "False", "True"]
    assert events_of(world, "revoked") == [
        ("Normal", "AccessVerified"),
        ("Warning", "AccessDenied"),
        ("Normal", "AccessVerified"),
    ]
    # The STS hiccup never turned the healthy one False, nor moved its transition time.
    assert status_transitions(timeline.states("steady")) == ["True"]
    assert {s[3] for s in timeline.states("steady") if s} == {initial["steady"]["lastTransitionTime"]}  # type: ignore[index]
    assert events_of(world, "steady") == [("Normal", "AccessVerified")]
    for name in fleet:
        assert events_of(world, name) == [("Warning", "Throttled"), ("Normal", "AccessVerified")], name


def _synchronized(world: World, fleet: list[str], start: float, end: float, bin_seconds: float = 0.25) -> bool:
    """Whether every credential of the fleet called AWS in the same short bins (a retry storm)."""
    keys = {name: f"{world.prefix}/{name}-" for name in fleet}
    bins: dict[int, set[str]] = {}
    for seen in world.proxy.seen:
        if seen.action not in READ_ACTIONS or not start <= seen.at < end:
            continue
        for name, key in keys.items():
            if any(key in sid for sid in seen.secret_ids):
                bins.setdefault(int((seen.at - start) / bin_seconds), set()).add(name)
    full = [index for index, names in bins.items() if len(names) == len(fleet)]
    # Equal jitter spreads retries over half the step: all of them together more than once is a storm.
    return len(full) > 1


def test_socket_reads_while_throttled_do_not_bypass_the_backoff(world: World) -> None:
    """A controller that keeps reading its credential during throttling must not turn into a hot loop on AWS."""
    world.apply("busy", {"secretArn": world.secret("busy"), "refreshInterval": SPEC_INTERVAL})
    # One botocore attempt per check (CCRED_AWS_MAX_ATTEMPTS=1; with 2 the retry's own sleep hides it until
    # botocore's retry quota runs dry); a long staleness so that the value is served all along.
    world.start_operator(extra_env={**FAST, "CCRED_MAX_STALENESS": "30s", "CCRED_AWS_MAX_ATTEMPTS": "1"})
    world.wait_reason("busy", "AccessVerified")
    with world.client() as client:
        value = client.get(world.namespace, "busy", refresh=True).value
        world.proxy.throttle(secret_id_contains=f"{world.prefix}/busy-")
        time.sleep(INTERVAL * 1.1 + 0.2)  # the value is now older than refreshInterval, and checks fail
        start = time.monotonic()
        reads = 0
        while time.monotonic() < start + 4.0:
            assert client.get(world.namespace, "busy").value == value  # still served: within staleness
            reads += 1
            time.sleep(0.05)  # a busy controller: ~20 reads/s
        end = time.monotonic()
    calls = calls_between(world, "busy", start, end)
    bound = max_calls_under_backoff(end - start, attempts=1)
    assert calls <= bound, (
        f"{calls} GetSecretValue calls for {reads} socket reads in {end - start:.1f}s (backoff allows {bound})"
    )


# --------------------------------------------------------------------------- Kubernetes API faults


def test_kubernetes_api_faults_and_restart_lose_no_update_and_nothing_flaps(world: World) -> None:
    kube, proxy, ns = world.kube, world.proxy, world.namespace
    names = ["alpha", "beta", "gamma"]
    arns = {name: world.secret(name) for name in [*names, "delta"]}
    for name in names:
        world.apply(name, {"secretArn": arns[name], "refreshInterval": SPEC_INTERVAL})
    first = world.start_operator(extra_env=FAST)
    for name in names:
        world.wait_reason(name, "AccessVerified")
    initial = {name: world.ready(name) for name in names}
    try:
        with world.client() as client, Timeline(world, [*names, "delta"]) as timeline:
            # 1. The watch stream drops: the operator re-watches and sees what happens next.
            dropped_at = time.monotonic()
            assert kube.drop_watches(ns) >= 1
            wait_until(
                lambda: kube.watches(ns, opened_after=dropped_at) >= 1,
                timeout=10,
                message="the operator did not re-watch",
            )
            # Made while the operator may still be re-watching: the API server resumes the new stream
            # from the last resourceVersion kopf saw, so nothing in between is lost.
            world.apply("delta", {"secretArn": arns["delta"], "refreshInterval": SPEC_INTERVAL})
            world.wait_reason("delta", "AccessVerified", timeout=10)
            assert client.get(ns, "delta").arn == arns["delta"]

            # 2. Status patches answered 409, 409, 500: retried until accepted, one Event.
            kube.fail_status_patches(times=2, status=409)
            kube.fail_status_patches(times=1, status=500)
            proxy.deny(secret_id_contains=f"{world.prefix}/alpha-")
            with pytest.raises(CredentialUnavailable) as denied:
                client.get(ns, "alpha", refresh=True)
            assert denied.value.status == 502
            world.wait_reason("alpha", "AccessDenied", timeout=10)
            first.wait_for_log(re.compile(r"The status of \S+ changed since it was read \(HTTP 409"), timeout=5)
            # The Event follows the status write that got through: wait for it rather than race it.
            wait_until(
                lambda: events_of(world, "alpha") == [("Normal", "AccessVerified"), ("Warning", "AccessDenied")],
                timeout=10,
                message=f"alpha's Events: {events_of(world, 'alpha')}",
            )

            # 3. An API server restart: every watch drops and a burst of requests fails with 503,
            #    while AWS recovers for alpha and gamma's spec changes.
            kube.fail_requests(None, r"^/api", status=503, times=12)
            restarted_at = time.monotonic()
            kube.drop_watches()
            proxy.clear()
            assert client.get(ns, "alpha", refresh=True).arn == arns["alpha"]  # AWS does not need the API
            world.update_spec("gamma", {"secretArn": arns["gamma"], "refreshInterval": "6s"})
            generation = (world.get("gamma") or {})["metadata"]["generation"]
            # After a burst of 503s the status writer's backoff may stand at 8-16 s (0.5 s doubling).
            world.wait_reason("alpha", "AccessVerified", timeout=45)
            wait_until(
                lambda: (world.ready("gamma") or {}).get("observedGeneration") == generation,
                timeout=45,
                message="gamma's spec change made during the API restart was never observed",
            )
            wait_until(
                lambda: kube.watches(ns, opened_after=restarted_at) >= 1,
                timeout=10,
                message="no watch after the API restart",
            )
            assert "re-checked every 6s" in (world.ready("gamma") or {})["message"]
            wanted = [("Normal", "AccessVerified"), ("Warning", "AccessDenied"), ("Normal", "AccessVerified")]
            wait_until(
                lambda: events_of(world, "alpha") == wanted,
                timeout=10,
                message=f"alpha's Events: {events_of(world, 'alpha')}",
            )

            # 4. A transition whose status write never gets through before the operator stops
            #    is written by the next operator: nothing is lost across a restart.
            kube.fail_status_patches(times=None, status=503)
            proxy.deny(secret_id_contains=f"{world.prefix}/beta-")
            with pytest.raises(CredentialUnavailable):
                client.get(ns, "beta", refresh=True)
            first.wait_for_log(f"{ns}/beta: AccessDenied", timeout=5)
            first.wait_for_log(re.compile(r"Writing the status of \S+/beta failed \(HTTP 503"), timeout=5)
            assert world.ready("beta")["reason"] == "AccessVerified"  # type: ignore[index]
            first.stop()
            kube.clear_faults()
            second = world.start_operator(extra_env=FAST)
            world.wait_reason("beta", "AccessDenied", timeout=10)
            # After the restart every credential is re-verified and served again.
            for name in ("alpha", "gamma", "delta"):
                second.wait_for_log(f"{ns}/{name}: AccessVerified", timeout=10)
                assert client.get(ns, name).arn == arns[name]
            with pytest.raises(CredentialUnavailable) as still_denied:
                client.get(ns, "beta")
            assert still_denied.value.status == 502
            timeline.catch_up()
    finally:
        kube.clear_faults()

    for name in [*names, "delta"]:
        assert_no_flapping(timeline.states(name), name)
    assert status_transitions(timeline.states("alpha")) == ["True", "False", "True"]
    assert status_transitions(timeline.states("beta")) == ["True", "False"]
    assert events_of(world, "beta") == [("Normal", "AccessVerified"), ("Warning", "AccessDenied")]
    # Untouched by any transition: one verdict, one transition time, one Event, through all of it.
    for name in ("gamma",):
        assert {s[3] for s in timeline.states(name) if s} == {initial[name]["lastTransitionTime"]}  # type: ignore[index]
        assert events_of(world, name) == [("Normal", "AccessVerified")]
    assert status_transitions(timeline.states("delta")) == ["True"]
    assert events_of(world, "delta") == [("Normal", "AccessVerified")]


def test_a_newer_verdict_wins_over_writes_pending_during_an_api_outage(world: World) -> None:
    """While status writes fail, a check changes something and the next one changes it back."""
    kube, proxy, ns = world.kube, world.proxy, world.namespace
    # A long refreshInterval: nothing but these checks happens, so a stale write stays visible.
    for name in ("blip", "flip"):
        world.apply(name, {"secretArn": world.secret(name), "refreshInterval": "1h"})
    world.start_operator(extra_env={**FAST, "CCRED_MAX_STALENESS": "1h"})
    expected = {name: world.wait_reason(name, "AccessVerified") for name in ("blip", "flip")}
    try:
        with world.client() as client:
            kube.fail_status_patches(times=None, status=503)
            # blip: a transient failure (Ready stays True, the message says so), then a success.
            proxy.throttle(secret_id_contains=f"{world.prefix}/blip-")
            client.get(ns, "blip", refresh=True)
            # flip: access denied (Ready False, Warning Event queued), then readable again.
            proxy.deny(secret_id_contains=f"{world.prefix}/flip-")
            with pytest.raises(CredentialUnavailable):
                client.get(ns, "flip", refresh=True)
            proxy.clear()
            client.get(ns, "flip", refresh=True)
            # blip backs off, and a refresh does not bypass the backoff: its own retry recovers it.
            wait_until(
                lambda: "transiently" not in next(i.message for i in client.list() if i.name == "blip"),
                timeout=10,
                message="blip did not recover after its backoff",
            )
            operator_view = {info.name: (info.ready, info.reason, info.message) for info in client.list()}
            time.sleep(1.0)
            kube.clear_faults()
            time.sleep(4.0)  # the status writer's retry (0.5 s doubling) gets through
    finally:
        kube.clear_faults()
    problems = []
    for name in ("blip", "flip"):
        condition = world.ready(name)
        assert condition is not None
        state = (condition["status"] == "True", condition["reason"], condition["message"])
        if state != operator_view[name] or condition != expected[name]:
            problems.append(f"{name}: status says {state}, the operator's last verdict is {operator_view[name]}")
        last_event = world.events(name)[-1]
        if last_event["reason"] != condition["reason"]:
            problems.append(f"{name}: last Event {last_event['reason']} while Ready is {condition['reason']}")
    assert not problems, problems


# --------------------------------------------------------------------------- two replicas


def test_two_replicas_serve_and_converge_without_flapping(world: World) -> None:
    ns = world.namespace
    names = ["one", "two", "three"]
    arns = {name: world.secret(name) for name in names}
    for name in names:
        world.apply(name, {"secretArn": arns[name], "refreshInterval": SPEC_INTERVAL})
    sockets = [str(world.workdir / "a.sock"), str(world.workdir / "b.sock")]
    # Each replica reaches AWS through its own proxy (same moto), so that a change can be shown
    # to one replica first: the other must then find the verdict already written.
    with FaultProxy(world.aws.endpoint) as proxy_b:
        proxies = [world.proxy, proxy_b]
        # Both replicas start together, as a Deployment's pods do.
        replicas = [
            world.start_operator(extra_env=FAST, socket_path=path, aws_env=world.irsa_env(proxy.endpoint), wait=False)
            for path, proxy in zip(sockets, proxies, strict=True)
        ]
        for replica in replicas:
            replica.wait_for_log("Serving credentials on", timeout=20)
        for name in names:
            world.wait_reason(name, "AccessVerified")
        clients = [world.client(path) for path in sockets]
        try:
            # The status shows one replica's verdicts; the other may still be listing its credentials.
            wait_until(
                lambda: all(client.healthy() for client in clients), timeout=20, message="a replica is not healthy"
            )
            values = {name: clients[0].get(ns, name).value for name in names}
            assert {name: clients[1].get(ns, name).value for name in names} == values
            time.sleep(1.0)  # let both replicas' first writes land
            settled = {name: world.ready(name) for name in names}
            # Status writes carry resourceVersion: the replica that loses the race re-reads and
            # finds its transition reported already, so each transition has one Event.
            started_events = {name: events_of(world, name) for name in names}
            for name, events in started_events.items():
                assert events == [("Normal", "AccessVerified")], (name, events)
            patches_before = status_patches(world)
            with Timeline(world, names) as timeline:
                # Two refresh intervals of both replicas checking on their own schedules.
                window_start = time.monotonic()
                while time.monotonic() < window_start + 2 * INTERVAL + 0.5:
                    for client in clients:
                        assert {name: client.get(ns, name).value for name in names} == values
                    time.sleep(0.5)
                window = time.monotonic() - window_start
                patches = status_patches(world) - patches_before
                for name in names:
                    assert timeline.states(name) == [_state(settled[name])], f"{name} flapped: {timeline.changes[name]}"
                # Documented: at most about two status writes per refreshInterval, whatever the replica count.
                assert patches <= len(names) * (2 * window / INTERVAL + 1), (patches, window)

                # A transition seen by replica A first, then by B: one Event, no flapping.
                proxies[0].deny(secret_id_contains=f"{world.prefix}/one-")
                with pytest.raises(CredentialUnavailable):
                    clients[0].get(ns, "one", refresh=True)
                world.wait_reason("one", "AccessDenied", timeout=5)
                time.sleep(0.2)  # B's watch delivers A's write
                proxies[1].deny(secret_id_contains=f"{world.prefix}/one-")
                wait_until(
                    lambda: _unavailable(clients[1], ns, "one"),
                    timeout=INTERVAL * 1.1 + 3,
                    message="the second replica kept serving a revoked credential",
                )
                # And back, the same way.
                proxies[0].clear()
                clients[0].get(ns, "one", refresh=True)
                world.wait_reason("one", "AccessVerified", timeout=5)
                time.sleep(0.2)
                proxies[1].clear()
                wait_until(
                    lambda: not _unavailable(clients[1], ns, "one"),
                    timeout=INTERVAL * 1.1 + 3,
                    message="the second replica never served the credential again",
                )
                time.sleep(1.0)  # the second replica's recovery write, if any, lands
                timeline.catch_up()
        finally:
            for client in clients:
                client.close()
            for replica in replicas:
                replica.stop()  # before proxy_b goes away

    assert_no_flapping(timeline.states("one"), "one")
    assert status_transitions(timeline.states("one")) == ["True", "False", "True"]
    assert events_of(world, "one")[len(started_events["one"]) :] == [
        ("Warning", "AccessDenied"),
        ("Normal", "AccessVerified"),
    ], "one Event per transition, not one per replica"
    for name in ("two", "three"):
        assert timeline.states(name) == [_state(settled[name])], f"{name} flapped: {timeline.changes[name]}"
        assert events_of(world, name) == started_events[name], "no Event without a transition"


def _unavailable(client: CredentialClient, namespace: str, name: str) -> bool:
    try:
        client.get(namespace, name)
    except CredentialUnavailable as exc:
        return exc.status == 502
    return False


def test_a_stalled_watch_stream_is_abandoned_and_nothing_is_missed(world: World) -> None:
    world.apply("first", {"secretArn": world.secret("first")})
    # The server is asked to end streams after 60s (it will not: stalled); the client gives up after 3s.
    world.start_operator(extra_env={"CCRED_WATCH_SERVER_TIMEOUT": "60", "CCRED_WATCH_CLIENT_TIMEOUT": "3"})
    world.wait_reason("first", "AccessVerified")
    world.kube.stall_watches()
    try:
        world.apply("second", {"secretArn": world.secret("second")})  # its ADDED event is swallowed
        time.sleep(0.5)
    finally:
        world.kube.stall_watches(False)
    # Only a re-watch (after the client-side timeout) can bring it: the stalled stream never will.
    world.wait_reason("second", "AccessVerified", timeout=15)
