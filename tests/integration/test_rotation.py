"""Rotation in seconds: Secrets Manager's ``Secret Label Updated`` events through a real SQS queue
(moto's, behind the fault proxy), two replicas that converge through the status, and a queue
that cannot be read. Every credential here refreshes once an hour: only an event (or another
replica's status) can make a new version reach the socket within the tests' deadlines."""

from __future__ import annotations

import json
import re
import time

from connector_credentials.client import Credential, CredentialError
from tests.integration.conftest import World
from tests.integration.test_doctor import doctor
from tests.support.awsemu import label_moved
from tests.support.runner import OperatorProcess, wait_until
from tests.support.scrape import free_port, samples, scrape, value
from tests.support.watching import Watcher

HOURLY = {"refreshInterval": "1h"}


def serves(world: World, socket_path: str, name: str) -> str | None:
    """The value served now (``None`` while there is none: pending, failing)."""
    with world.client(socket_path) as client:
        try:
            return client.get(world.namespace, name).value
        except CredentialError:
            return None


def replica(world: World, index: int, queue: str | None, **env: str) -> tuple[OperatorProcess, str, int]:
    socket_path, port = str(world.workdir / f"r{index}.sock"), free_port()
    extra = {"CCRED_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}", **env}
    if queue is not None:
        extra["CCRED_ROTATION_QUEUE_URL"] = queue
    return world.start_operator(extra_env=extra, socket_path=socket_path), socket_path, port


def counted(port: int, name: str, **labels: str) -> float:
    return value(samples(scrape(port)), name, **labels)


def test_a_rotation_event_reaches_both_replicas_in_seconds(world: World) -> None:
    arn = world.secret("slack")
    world.apply("slack", {"secretArn": arn, **HOURLY})
    queue = world.aws.create_queue(f"rotations-{world.namespace}")
    replicas = [replica(world, i, queue) for i in range(2)]
    world.wait_reason("slack", "AccessVerified")
    first = world.canaries[0]
    for _, socket_path, _ in replicas:
        wait_until(lambda path=socket_path: serves(world, path, "slack") == first, timeout=20, message="v1")

    # The controller of each replica watches the credential (sync and async clients).
    watchers = [
        Watcher(kind, path, world.namespace, "slack")
        for kind, (_, path, _) in zip(("sync", "async"), replicas, strict=True)
    ]
    try:
        for watcher in watchers:
            first_line = watcher.next(timeout=10)
            assert isinstance(first_line, Credential) and first_line.value == first
        new_value = world.canary("rotated")
        version = world.aws.put_value(arn, string=new_value)
        sent = time.monotonic()
        world.aws.send(queue, label_moved(arn, version))
        for watcher in watchers:
            # An hour's refreshInterval: only the event (or the other replica's status) brings it now.
            line = watcher.next(timeout=15)
            assert isinstance(line, Credential), line
            assert (line.value, line.version_id) == (new_value, version)
        took = time.monotonic() - sent
    finally:
        for watcher in watchers:
            watcher.close()
    wait_until(lambda: world.aws.queue_depth(queue) == 0, timeout=10, message="the event was not deleted")
    wait_until(lambda: world.status("slack").get("versionId") == version, timeout=10, message="status.versionId")

    # One replica received the event; the other read the version it saw in the status.
    received = [p for p, _, port in replicas if counted(port, "ccred_rotation_events_total", outcome="refreshed")]
    assert len(received) == 1, [p.output[-2000:] for p, _, _ in replicas]
    other = next(p for p, _, _ in replicas if p is not received[0])
    assert "Rotation event: 'AWSCURRENT' of" in received[0].output
    assert f"names version {version}" in other.output
    receiver_port = next(port for p, _, port in replicas if p is received[0])
    assert counted(receiver_port, "ccred_rotation_delivery_seconds_count") == 1
    assert counted(receiver_port, "ccred_rotation_queue_receiving") == 1
    print(f"rotation reached both replicas' watch streams {took:.2f}s after the event was sent")


def test_what_is_not_an_event_is_counted_deleted_and_logged_once_without_its_body(world: World) -> None:
    arn = world.secret("slack")
    world.apply("slack", {"secretArn": arn, **HOURLY})
    queue = world.aws.create_queue(f"rotations-{world.namespace}")
    process, socket_path, port = replica(world, 0, queue)
    world.wait_reason("slack", "AccessVerified")
    hidden = world.canary("in-a-message")  # whatever a message holds, it is never logged
    world.aws.send(queue, f"not json {hidden}")
    world.aws.send(queue, f"still not json {hidden}")
    world.aws.send(queue, json.dumps({"padding": hidden * 400}))  # 20 KiB: oversized
    world.aws.send(queue, json.dumps({"source": "aws.ec2", "detail-type": "EC2 Instance State", "id": hidden}))
    nobody = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/nobody-AbCdEf"
    world.aws.send(queue, label_moved(nobody, "v9"))
    wait_until(lambda: world.aws.queue_depth(queue) == 0, timeout=30, message="messages were left on the queue")

    def outcomes() -> dict[str, float]:
        found = samples(scrape(port))
        kinds = ("malformed", "ignored", "undeclared")
        return {kind: value(found, "ccred_rotation_events_total", outcome=kind) for kind in kinds}

    wait_until(lambda: outcomes() == {"malformed": 3, "ignored": 1, "undeclared": 1}, timeout=10, message=outcomes)
    assert process.output.count("malformed (not-json)") == 1, "a kind is logged once"
    assert process.output.count("malformed (oversized)") == 1
    assert "not a Secret Label Updated event (another-event)" in process.output
    assert serves(world, socket_path, "slack") == world.canaries[0]  # the consumer and the socket go on


def test_a_queue_that_cannot_be_read_is_reported_and_polling_goes_on(world: World) -> None:
    arn = world.secret("slack")
    world.apply("slack", {"secretArn": arn, "refreshInterval": "5s"})
    queue = world.aws.create_queue(f"rotations-{world.namespace}")
    denied = world.proxy.add_rule(
        "ReceiveMessage",
        error_code="AccessDenied",
        status=403,
        message="User: arn:aws:sts::123456789012:assumed-role/xpander-controller/s is not authorized to "
        "perform: sqs:receivemessage on resource: {action}",
    )
    process, socket_path, port = replica(world, 0, queue, CCRED_BACKOFF_BASE="0.5", CCRED_BACKOFF_CAP="2")
    process.wait_for_log("IAM denies sqs:ReceiveMessage", timeout=20)
    assert "ReceiveRotationEvents statement of deploy/iam/policy.json" in process.output
    wait_until(lambda: counted(port, "ccred_rotation_queue_errors_total", reason="denied") >= 1, timeout=10)
    assert counted(port, "ccred_rotation_queue_receiving") == 0
    # Polling keeps the credential fresh meanwhile.
    new_value = world.canary("polled")
    world.aws.put_value(arn, string=new_value)
    wait_until(lambda: serves(world, socket_path, "slack") == new_value, timeout=20, message="polling stopped")
    # Allowed again: the consumer says so and events work.
    world.proxy.remove(denied)
    mark = len(process.output)
    process.wait_for_log(re.compile("Receiving rotation events from .* again"), timeout=30, since=mark)
    assert counted(port, "ccred_rotation_queue_receiving") == 1

    throttled = world.proxy.throttle("ReceiveMessage")
    process.wait_for_log("SQS throttles sqs:ReceiveMessage", timeout=60, since=mark)
    world.proxy.remove(throttled)


def test_a_missing_queue_is_named_in_the_log_and_by_doctor(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack"), **HOURLY})
    missing = f"{world.aws.endpoint}/123456789012/no-such-queue-{world.namespace}"
    process, socket_path, port = replica(world, 0, missing)
    process.wait_for_log(f"the queue {missing} does not exist", timeout=20)
    wait_until(lambda: counted(port, "ccred_rotation_queue_errors_total", reason="missing") >= 1, timeout=10)
    world.wait_reason("slack", "AccessVerified")
    assert serves(world, socket_path, "slack") == world.canaries[0]

    report = doctor(world, extra_env={"CCRED_ROTATION_QUEUE_URL": missing})
    assert report.code == 1, report.stdout
    assert report.result("rotation-queue") == "FAIL"
    assert "does not exist" in report.line("rotation-queue")
    present = world.aws.create_queue(f"rotations-{world.namespace}")
    report = doctor(world, extra_env={"CCRED_ROTATION_QUEUE_URL": present})
    assert report.result("rotation-queue") == "PASS", report.stdout
    assert report.code == 0
