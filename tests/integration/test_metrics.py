"""/metrics for real: the operator's console script on a free TCP port, scraped while it runs."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.conftest import World
from tests.support.runner import wait_until
from tests.support.scrape import Samples, free_port, samples, scrape, value


def test_metrics_are_scraped_during_a_run_and_never_hold_a_value(world: World) -> None:
    slack = world.secret("slack")
    world.apply("slack", {"secretArn": slack})
    world.apply("denied", {"secretArn": world.secret("denied")})
    # The batch action refused: single reads, and the denied one is denied by GetSecretValue itself.
    world.proxy.deny(action="BatchGetSecretValue")
    world.proxy.deny(f"{world.prefix}/denied")
    port = free_port()
    operator = world.start_operator(extra_env={"CCRED_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}"})
    assert f"Serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in operator.output
    world.wait_reason("slack", "AccessVerified")
    world.wait_reason("denied", "AccessDenied")

    def settled() -> Samples | None:
        found = samples(scrape(port))
        return found if value(found, "ccred_watch_connected") == 1 else None

    first = wait_until(settled, timeout=20, message="ccred_watch_connected never became 1")
    credentials = {
        (labels["name"], labels["reason"], labels["ready"]): v
        for labels, v in first["ccred_credentials"]
        if labels["namespace"] == world.namespace
    }
    assert credentials == {("slack", "AccessVerified", "true"): 1.0, ("denied", "AccessDenied", "false"): 1.0}
    [(age_labels, age)] = first["ccred_value_age_seconds"]  # only the ready one holds a value
    assert age_labels == {"namespace": world.namespace, "name": "slack"}
    assert 0 <= age < 60
    assert value(first, "ccred_aws_requests_total", operation="GetSecretValue", outcome="ok") >= 1
    assert value(first, "ccred_aws_requests_total", operation="GetSecretValue", outcome="denied") >= 1
    assert value(first, "ccred_aws_requests_total", operation="BatchGetSecretValue", outcome="denied") >= 1
    assert value(first, "ccred_aws_requests_total", operation="GetCallerIdentity", outcome="ok") >= 1
    calls = value(first, "ccred_aws_requests_total")
    assert value(first, "ccred_aws_request_duration_seconds_count") == calls
    assert value(first, "ccred_status_writes_total", result="ok") >= 2
    before = value(first, "ccred_socket_requests_total", code="200")

    with world.client() as client:
        for _ in range(3):
            client.get(world.namespace, "slack")
        client.get(world.namespace, "slack", refresh=True)  # a read of AWS now
    second = samples(scrape(port))
    assert value(second, "ccred_socket_requests_total", code="200") >= before + 4
    assert value(second, "ccred_socket_request_duration_seconds_count") >= 4
    assert value(second, "ccred_aws_requests_total", operation="GetSecretValue", outcome="ok") > value(
        first, "ccred_aws_requests_total", operation="GetSecretValue", outcome="ok"
    )

    text = scrape(port)
    for canary in world.canaries:
        assert canary not in text
    for version in world.aws.describe(slack)["VersionIdsToStages"]:
        assert version not in text  # nothing derived from a value, not even its versionId
    # Only /metrics is served.
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/credentials", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    else:
        raise AssertionError("the metrics port answered another path")


def listening_ports(pid: int) -> set[int]:
    """The TCP ports the process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_zero_turns_the_endpoint_off(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})
    operator = world.start_operator(extra_env={"CCRED_METRICS_BIND_ADDRESS": "0"})
    world.wait_reason("slack", "AccessVerified")
    assert "Prometheus" not in operator.output
    assert operator.pid is not None
    assert listening_ports(operator.pid) == set()
