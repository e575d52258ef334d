"""Production hardening, as a user sees it: the operator's console script against the real API
server and moto. Shutdown drains instead of answering "not declared"; a bug is not a hot loop;
?refresh=true is bounded; a benign edit keeps serving during an outage; an expired token is
transient; a status write the API refuses for good is not retried every few seconds."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest

from connector_credentials.client import (
    CredentialClient,
    CredentialError,
    CredentialUnavailable,
    ServerUnreachable,
)
from tests.integration.conftest import World
from tests.support.awsbatch import READ_ACTIONS
from tests.support.kube import shipped_rbac
from tests.support.runner import wait_until

FAST = {
    "CCRED_DEFAULT_REFRESH_INTERVAL": "5s",
    "CCRED_BACKOFF_BASE": "0.5",
    "CCRED_BACKOFF_CAP": "4",
    "CCRED_AWS_CONNECT_TIMEOUT": "1",
    "CCRED_AWS_READ_TIMEOUT": "1",
}


def answers_during(client: CredentialClient, namespace: str, name: str, stop: threading.Event) -> list[Any]:
    seen: list[Any] = []
    while not stop.is_set():
        try:
            seen.append(client.get(namespace, name).value)
        except (CredentialError, ServerUnreachable) as exc:
            seen.append(exc)
        time.sleep(0.05)
    return seen


def test_sigterm_drains_serves_what_is_held_and_never_says_not_declared(world: World) -> None:
    value = world.canary("drain")
    world.apply("slack", {"secretArn": world.secret("slack", string=value)})
    operator = world.start_operator(extra_env={"CCRED_SHUTDOWN_DRAIN": "3s"})
    world.wait_reason("slack", "AccessVerified")
    with world.client() as client:
        assert client.get(world.namespace, "slack").value == value
        assert client.healthy()
        stop = threading.Event()
        seen: list[Any] = []

        def read() -> None:
            with world.client() as own:
                seen.extend(answers_during(own, world.namespace, "slack", stop))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = time.monotonic()
        operator.send_signal(signal.SIGTERM)
        wait_until(lambda: not client.healthy(), timeout=1, message="/healthz still 200 after SIGTERM")
        with pytest.raises(CredentialUnavailable) as refreshing:
            client.get(world.namespace, "slack", refresh=True)
        assert (refreshing.value.status, refreshing.value.reason) == (503, "ShuttingDown")
        assert refreshing.value.retry_after is not None
        assert client.get(world.namespace, "slack").value == value  # still served, from memory
        operator.wait_for_log("serving the values held for 3s more", timeout=5)
        code = operator.wait(timeout=15)
        elapsed = time.monotonic() - sent
        stop.set()
        reader.join(5)
    assert code == 0
    # The drain, then a prompt exit: kopf is stopped after it, with nothing of ours left to wait for
    # (stopping on the signal itself, it would wait 5 s for our open connections first).
    assert 2.5 <= elapsed < 6, elapsed
    statuses = Counter(type(item).__name__ if not isinstance(item, str) else "value" for item in seen)
    assert statuses["value"] >= 10, statuses  # served through the drain
    assert not [item for item in seen if isinstance(item, CredentialError) and item.status == 404], statuses
    # Only once the socket is gone does the client hear that nobody serves: never a 404.
    assert all(isinstance(item, str | ServerUnreachable) for item in seen), statuses


def test_an_undecodable_json_secret_is_a_verdict_not_a_hot_loop(world: World) -> None:
    world.apply("deep", {"secretArn": world.secret("deep", string="[" * 5000), "jsonKey": "token"})
    world.start_operator(extra_env=FAST)
    condition = world.wait_reason("deep", "JsonKeyNotFound")
    assert "not JSON" in condition["message"]
    started = time.monotonic()
    with world.client() as client:
        with pytest.raises(CredentialUnavailable) as refused:
            client.get(world.namespace, "deep")
        assert (refused.value.status, refused.value.reason) == (502, "JsonKeyNotFound")
    time.sleep(max(0.0, 3 - (time.monotonic() - started)))  # a window in which a hot loop would read dozens
    assert world.proxy.reads(f"{world.prefix}/deep") <= 2


def test_refresh_requests_are_bounded_while_throttled_and_shared_when_healthy(world: World) -> None:
    world.apply("busy", {"secretArn": world.secret("busy")})
    # A long interval: no scheduled refresh of its own falls into the window measured below.
    world.apply("calm", {"secretArn": world.secret("calm"), "refreshInterval": "1h"})
    world.start_operator(extra_env={**FAST, "CCRED_MIN_REFRESH_GAP": "2s"})
    world.wait_reason("busy", "AccessVerified")
    world.wait_reason("calm", "AccessVerified")
    with world.client() as client:
        value = client.get(world.namespace, "busy").value
        world.proxy.throttle(secret_id_contains=f"{world.prefix}/busy-")
        client.get(world.namespace, "busy", refresh=True)  # throttled: the backoff starts
        before = world.proxy.reads(f"{world.prefix}/busy-")
        for _ in range(20):
            assert client.get(world.namespace, "busy", refresh=True).value == value
        assert world.proxy.reads(f"{world.prefix}/busy-") - before <= 1
        world.proxy.clear()

        time.sleep(2.1)  # past the gap of the reads at start
        window_start = time.monotonic()
        results: list[Any] = []

        def refresh() -> None:
            with world.client() as own:
                results.append(own.get(world.namespace, "calm", refresh=True))

        threads = [threading.Thread(target=refresh) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        elapsed = time.monotonic() - window_start
        assert len(results) == 20
        # Twenty refreshes: reads at least the gap (2 s) apart, so one or two here, never twenty.
        reads = sorted(
            seen.at
            for seen in world.proxy.seen
            if seen.action in READ_ACTIONS
            and seen.at >= window_start
            and any(f"{world.prefix}/calm-" in sid for sid in seen.secret_ids)
        )
        assert 1 <= len(reads) <= 1 + int(elapsed / 2.0), (reads, elapsed)
        assert all(later - earlier >= 1.9 for earlier, later in itertools.pairwise(reads)), reads


def test_an_interval_edit_during_an_outage_keeps_serving_and_ready(world: World) -> None:
    value = world.canary("kept")
    arn = world.secret("kept", string=value)
    world.apply("kept", {"secretArn": arn, "refreshInterval": "5s"})
    world.start_operator(extra_env=FAST)
    world.wait_reason("kept", "AccessVerified")
    with world.client() as client:
        assert client.get(world.namespace, "kept").value == value
        world.proxy.fail_5xx(secret_id_contains=f"{world.prefix}/kept-")
        world.update_spec("kept", {"secretArn": arn, "refreshInterval": "1m"})
        generation = (world.get("kept") or {})["metadata"]["generation"]
        wait_until(
            lambda: (world.ready("kept") or {}).get("observedGeneration") == generation,
            timeout=10,
            message="the interval edit was never observed",
        )
        ready = world.ready("kept") or {}
        assert (ready["status"], ready["reason"]) == ("True", "AccessVerified")
        assert "re-checked every 1m" in ready["message"]
        assert client.get(world.namespace, "kept").value == value
        # What is read changes: the value held no longer applies, and AWS is down.
        world.update_spec("kept", {"secretArn": arn, "refreshInterval": "1m", "jsonKey": "token"})
        wait_until(lambda: (world.ready("kept") or {}).get("status") == "False", timeout=15, message="still Ready")
        with pytest.raises(CredentialUnavailable):
            client.get(world.namespace, "kept")


def test_an_expired_token_after_verification_keeps_serving(world: World) -> None:
    value = world.canary("expiring")
    world.apply("slack", {"secretArn": world.secret("slack", string=value), "refreshInterval": "5s"})
    # GetCallerIdentity on every check, so the expired token is on the path of the next one.
    world.start_operator(extra_env={**FAST, "CCRED_IDENTITY_CACHE_SECONDS": "0"})
    world.wait_reason("slack", "AccessVerified")
    world.proxy.add_rule(
        "GetCallerIdentity",
        error_code="ExpiredToken",
        message="The security token included in the request is expired",
        status=400,
    )
    with world.client() as client:
        assert client.get(world.namespace, "slack").value == value
        wait_until(
            lambda: "token had expired" in (world.ready("slack") or {}).get("message", ""),
            timeout=10,
            message="the expired token was never reported",
        )
        ready = world.ready("slack") or {}
        assert (ready["status"], ready["reason"]) == ("True", "AccessVerified"), ready
        assert client.get(world.namespace, "slack").value == value  # still served: it is transient
        world.proxy.clear()
        wait_until(
            lambda: "token had expired" not in (world.ready("slack") or {}).get("message", "x"),
            timeout=10,
            message="no recovery after the token was renewed",
        )
        assert [e["reason"] for e in world.events("slack")] == ["AccessVerified"]


def test_a_status_write_refused_by_rbac_is_logged_once_and_not_retried_hot(world: World) -> None:
    # A real cause: the Role no longer lets the operator create Events.
    role = next(doc for doc in shipped_rbac(world.namespace) if doc["kind"] == "Role")
    role["rules"] = [rule for rule in role["rules"] if "events" not in rule["resources"]]
    world.cluster.apply("rbac.authorization.k8s.io/v1/roles", world.namespace, role)
    world.apply("slack", {"secretArn": world.secret("slack"), "refreshInterval": "30s"})
    operator = world.start_operator(extra_env=FAST)
    world.wait_reason("slack", "AccessVerified")
    operator.wait_for_log("Writing the Event of", timeout=10)
    # Three checks of its own, each reported through the same writer: at least 2 s by
    # CCRED_MIN_REFRESH_GAP (1 s between reads), long enough for a hot retry to show.
    with world.client() as client:
        for _ in range(3):
            client.get(world.namespace, "slack", refresh=True)
    refusals = [line for line in operator.output.splitlines() if "Writing the Event of" in line]
    assert len(refusals) == 1, refusals
    assert "was refused (HTTP 403" in refusals[0] and "retrying every 30s" in refusals[0]
    posts = world.kube.requests("POST", rf"/namespaces/{world.namespace}/events$")
    assert len(posts) == 1
    # This test breaks the RBAC on purpose: the 403 is the point, not a defect.
    world.operators.clear()
    operator.stop()


def test_a_refused_event_does_not_hold_back_the_next_status_write(world: World) -> None:
    # #17, defect 6: the status writer slept a whole refreshInterval (here 5 minutes) after a
    # refused Event before it wrote anything else, so a new verdict stayed invisible meanwhile.
    role = next(doc for doc in shipped_rbac(world.namespace) if doc["kind"] == "Role")
    role["rules"] = [rule for rule in role["rules"] if "events" not in rule["resources"]]
    world.cluster.apply("rbac.authorization.k8s.io/v1/roles", world.namespace, role)
    spec = {"secretArn": world.secret("slack"), "refreshInterval": "5m"}
    world.apply("slack", spec)
    operator = world.start_operator(extra_env=FAST)
    world.wait_reason("slack", "AccessVerified")
    operator.wait_for_log("Writing the Event of", timeout=10)
    # A spec edit the status must answer at once: the secret is plain text, so no jsonKey is found.
    world.update_spec("slack", {**spec, "jsonKey": "api_token"})
    world.wait_reason("slack", "JsonKeyNotFound", timeout=15)
    refusals = [line for line in operator.output.splitlines() if "Writing the Event of" in line]
    assert len(refusals) == 1, refusals  # the second transition's Event is refused too, and not logged again
    assert "retrying every 300s" in refusals[0]
    # This test breaks the RBAC on purpose: the 403 is the point, not a defect.
    world.operators.clear()
    operator.stop()
