"""Batched and shared reads, as AWS sees them: the operator's console script against the real API
server and moto behind the fault proxy, which records every call (BatchGetSecretValue's ids too)."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

from tests.integration.conftest import World
from tests.support.runner import wait_until

FAST = {"CCRED_DEFAULT_REFRESH_INTERVAL": "5s", "CCRED_BACKOFF_BASE": "0.5", "CCRED_BACKOFF_CAP": "4"}


def reads_of(world: World, start: float = 0.0, end: float = math.inf) -> list[Any]:
    """The read requests (single or batch) naming one of this test's secrets, in [start, end)."""
    return [
        seen
        for seen in world.proxy.seen
        if seen.action in ("GetSecretValue", "BatchGetSecretValue")
        and start <= seen.at < end
        and any(world.prefix in sid for sid in seen.secret_ids)
    ]


def per_secret(reads: list[Any]) -> Counter[str]:
    return Counter(sid for seen in reads for sid in seen.secret_ids)


def wait_all(world: World, names: list[str], reason: str = "AccessVerified", timeout: float = 60) -> None:
    wait_until(
        lambda: all((world.ready(name) or {}).get("reason") == reason for name in names),
        timeout=timeout,
        message=f"not every credential reached {reason}",
    )


def test_current_versions_are_read_in_batches_of_twenty_cycle_after_cycle(world: World) -> None:
    names = [f"c{i:02d}" for i in range(45)]
    arns = {name: world.secret(name) for name in names}
    for name in names:
        world.apply(name, {"secretArn": arns[name], "refreshInterval": "5s"})
    started = time.monotonic()
    world.start_operator(extra_env=FAST)
    wait_all(world, names)
    first_pass_end = time.monotonic()

    first = reads_of(world, started, first_pass_end)
    assert {seen.action for seen in first} == {"BatchGetSecretValue"}, Counter(s.action for s in first)
    assert sorted(len(seen.secret_ids) for seen in first) == [5, 20, 20]
    assert per_secret(first) == Counter(arns.values())  # exactly one read per credential

    # Three refresh cycles: 45 secrets due within each other's jitter range cost 3 calls per cycle, not 45.
    window_start = time.monotonic() + 1.0
    window = 15.0
    wait_until(lambda: time.monotonic() > window_start + window, timeout=window + 5, message="the window")
    steady = reads_of(world, window_start, window_start + window)
    cycles = math.ceil(window / (5 * 0.9)) + 1
    assert len(steady) <= 3 * cycles, [len(seen.secret_ids) for seen in steady]
    assert {seen.action for seen in steady} == {"BatchGetSecretValue"}
    reads = per_secret(steady)
    assert set(reads) == set(arns.values()) and all(2 <= count <= cycles for count in reads.values()), reads
    with world.client() as client:
        assert client.get(world.namespace, "c07").value in world.canaries


def test_a_denied_secret_in_a_batch_fails_alone_with_the_words_of_get_secret_value(world: World) -> None:
    allowed = {name: world.secret(name) for name in ("alpha", "beta")}
    denied = world.secret("denied")
    for name, arn in allowed.items():
        world.apply(name, {"secretArn": arn})
    world.apply("denied", {"secretArn": denied})
    # The same secret twice (different keys): one read serves both.
    shared = world.secret("shared", string='{"user": "CANARY-user-1f", "password": "CANARY-pass-2e"}')
    world.canaries += ["CANARY-user-1f", "CANARY-pass-2e"]
    world.apply("shared-user", {"secretArn": shared, "jsonKey": "user"})
    world.apply("shared-password", {"secretArn": shared, "jsonKey": "password"})
    world.proxy.deny(f"{world.prefix}/denied")
    world.start_operator()
    wait_all(world, ["alpha", "beta", "shared-user", "shared-password"])
    condition = world.wait_reason("denied", "AccessDenied")
    assert "secretsmanager:GetSecretValue" in condition["message"] and denied in condition["message"]
    reads = reads_of(world)
    assert {seen.action for seen in reads} == {"BatchGetSecretValue"}
    assert per_secret(reads)[shared] == 1 and all(seen.secret_ids.count(shared) <= 1 for seen in reads)
    with world.client() as client:
        assert client.get(world.namespace, "shared-user").value == "CANARY-user-1f"
        assert client.get(world.namespace, "shared-password").value == "CANARY-pass-2e"
        assert client.get(world.namespace, "alpha").value in world.canaries


def test_pinned_versions_and_other_stages_are_read_alone(world: World) -> None:
    arn = world.secret("pinned")
    current = world.aws.put_value(arn, string=world.canary("second"))
    world.apply("by-version", {"secretArn": arn, "versionId": current})
    world.apply("previous", {"secretArn": arn, "versionStage": "AWSPREVIOUS"})
    world.apply("current", {"secretArn": arn})
    world.start_operator()
    wait_all(world, ["by-version", "previous", "current"])
    reads = reads_of(world)
    singles = [seen for seen in reads if seen.action == "GetSecretValue"]
    batches = [seen for seen in reads if seen.action == "BatchGetSecretValue"]
    assert len(singles) == 2 and len(batches) == 1, Counter(seen.action for seen in reads)


def test_a_refused_batch_action_falls_back_to_single_reads_and_says_so_once(world: World) -> None:
    names = [f"f{i:02d}" for i in range(25)]
    for name in names:
        world.apply(name, {"secretArn": world.secret(name)})
    world.proxy.deny(action="BatchGetSecretValue")
    operator = world.start_operator()
    wait_all(world, names)
    reads = reads_of(world)
    singles = per_secret([seen for seen in reads if seen.action == "GetSecretValue"])
    assert len(singles) == 25 and set(singles.values()) == {1}, singles
    assert 1 <= sum(1 for seen in reads if seen.action == "BatchGetSecretValue") <= 2
    warnings = [line for line in operator.output.splitlines() if "BatchGetSecretValue" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "docs/install-eks.md" in warnings[0], warnings


def test_a_read_of_an_unchecked_credential_overtakes_the_first_pass(world: World) -> None:
    names = [f"q{i:03d}" for i in range(120)]
    for name in names:
        world.apply(name, {"secretArn": world.secret(name)})
    # One AWS call at a time, every batch slow: the first pass takes six batches x 2 s.
    world.proxy.latency(2.0, action="BatchGetSecretValue")
    world.start_operator(extra_env={"CCRED_AWS_MAX_WORKERS": "1"})
    with world.client() as client:
        wait_until(client.healthy, timeout=20, message="/healthz")
        target = names[-1]
        sent = time.monotonic()
        value = client.get(world.namespace, target).value
        took = time.monotonic() - sent
    assert value in world.canaries
    own = [seen for seen in reads_of(world) if any(f"{world.prefix}/{target}-" in sid for sid in seen.secret_ids)]
    # It joined a batch that left at once on the priority lane (the one slot was busy), with others
    # due: one batch call (2 s), not a wait behind the first pass (six batches one after another, 12 s).
    assert own and own[0].action == "BatchGetSecretValue", [(seen.action, len(seen.secret_ids)) for seen in own]
    assert len(own[0].secret_ids) > 1, "a read someone waits on rides in a batch, not alone"
    still_unread = [n for n in names if world.ready(n) is None]
    assert still_unread, "the first pass had ended: the read proved nothing"
    assert took < 4.0, took
    wait_all(world, names, timeout=60)


def test_a_batch_that_fails_as_a_whole_is_a_transient_failure_of_each_secret(world: World) -> None:
    names = [f"t{i:02d}" for i in range(30)]
    for name in names:
        world.apply(name, {"secretArn": world.secret(name), "refreshInterval": "5s"})
    world.start_operator(extra_env={**FAST, "CCRED_MAX_STALENESS": "60s", "CCRED_AWS_MAX_ATTEMPTS": "1"})
    wait_all(world, names)

    def messages() -> list[str]:
        return [str((world.ready(name) or {}).get("message", "")) for name in names]

    throttling = world.proxy.throttle(action="BatchGetSecretValue")
    wait_until(
        lambda: all("failed transiently (Throttled)" in message for message in messages()),
        timeout=30,
        message="a throttled batch was not reported on each of its credentials",
    )
    # Within the staleness limit: still Ready, still served.
    assert all((world.ready(name) or {}).get("status") == "True" for name in names)
    with world.client() as client:
        assert client.get(world.namespace, "t03").value in world.canaries
    throttling.times = 0  # AWS is back
    wait_until(
        lambda: not any("transiently" in message for message in messages()),
        timeout=30,
        message="the credentials did not recover once batches got through",
    )
