"""The rotation queue's consumer (adapters/aws/rotation_queue.py) over a scripted SQS client: what it
calls (and so what IAM must allow), what it deletes, what it logs, and how it names a failure."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import botocore.exceptions
import pytest

from connector_credentials.adapters.aws import rotation_queue
from connector_credentials.adapters.aws.rotation_queue import IAM_ACTIONS, RotationQueue, queue_problem, queue_region
from connector_credentials.core.ports import NoMeter
from connector_credentials.core.rotation import LabelMoved

URL = "https://sqs.eu-west-1.amazonaws.com/111122223333/rotations"
ARN = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:xpander/prod/slack-AbCdEf"
#: The IAM action each SQS operation needs.
NEEDS = {"ReceiveMessage": "sqs:ReceiveMessage", "DeleteMessageBatch": "sqs:DeleteMessage"}


def event(version: str = "v2") -> str:
    return json.dumps(
        {
            "detail-type": "Secret Label Updated",
            "source": "aws.secretsmanager",
            "resources": [ARN],
            "detail": {"name": "xpander/prod/slack", "labelUpdated": "AWSCURRENT", "versionId": version},
        }
    )


class Sqs:
    """Answers each receive with the next batch of bodies (then nothing), records every call."""

    def __init__(self, batches: list[list[str]], *, failure: Exception | None = None) -> None:
        self.batches, self.failure = batches, failure
        self.delete_failure: Exception | None = None
        self.calls: list[str] = []
        self.deleted: list[str] = []

    def receive_message(self, **request: Any) -> dict[str, Any]:
        self.calls.append("ReceiveMessage")
        assert request == {"QueueUrl": URL, "MaxNumberOfMessages": 10, "WaitTimeSeconds": 20}
        if self.failure is not None:
            raise self.failure
        bodies = self.batches.pop(0) if self.batches else []
        return {"Messages": [{"ReceiptHandle": f"h{i}", "Body": body} for i, body in enumerate(bodies)]}

    def delete_message_batch(self, **request: Any) -> dict[str, Any]:
        self.calls.append("DeleteMessageBatch")
        if self.delete_failure is not None:
            raise self.delete_failure
        self.deleted += [entry["ReceiptHandle"] for entry in request["Entries"]]
        return {"Successful": [{"Id": entry["Id"]} for entry in request["Entries"]]}


class Counted(NoMeter):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.queue: list[str | None] = []

    def rotation_event(self, outcome: str) -> None:
        self.events.append(outcome)

    def rotation_queue(self, problem: str | None, *, receive: bool = True) -> None:
        self.queue.append(problem if receive else f"delete: {problem}")


async def run_until(queue: RotationQueue, done: Any) -> None:
    stop = asyncio.Event()

    async def watch() -> None:
        while not done():
            await asyncio.sleep(0.01)
        stop.set()

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(queue.run(stopping=stop.is_set), 10)
    await watcher


async def test_events_are_handed_over_and_everything_handled_is_deleted(caplog: pytest.LogCaptureFixture) -> None:
    hidden = "CANARY-in-a-body"
    sqs, meter = Sqs([[event(), f"not json {hidden}", f"nor this {hidden}", "x" * 20_000]]), Counted()
    seen: list[LabelMoved] = []

    def rotated(moved: LabelMoved) -> str:
        seen.append(moved)
        return "refreshed"

    queue = RotationQueue(URL, lambda: sqs, rotated=rotated, meter=meter)
    with caplog.at_level(logging.DEBUG):
        await run_until(queue, lambda: len(sqs.deleted) == 4)
    assert [m.version_id for m in seen] == ["v2"]
    assert sorted(meter.events) == ["malformed", "malformed", "malformed", "refreshed"]
    assert sorted(sqs.deleted) == ["h0", "h1", "h2", "h3"]
    said = [r.getMessage() for r in caplog.records]
    assert sum("malformed (not-json)" in line for line in said) == 1  # once per kind
    assert sum("malformed (oversized)" in line for line in said) == 1
    assert not [line for line in said if hidden in line]
    # What IAM must allow is what the policy's statement names (deploy/iam/policy.json's test).
    assert {NEEDS[call] for call in sqs.calls} | {"sqs:GetQueueAttributes"} == set(IAM_ACTIONS)


def client_error(code: str, status: int, operation: str = "ReceiveMessage") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "said"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (client_error("AccessDenied", 403), "denied", "add the ReceiveRotationEvents statement"),
        (client_error("KMS.AccessDeniedException", 400), "denied", "kms:Decrypt"),
        (client_error("AWS.SimpleQueueService.NonExistentQueue", 400), "missing", "does not exist"),
        (client_error("QueueDoesNotExist", 400), "missing", "check its URL and region"),
        (client_error("ThrottlingException", 400), "throttled", "SQS throttles sqs:ReceiveMessage"),
        (client_error("RequestThrottled", 403), "throttled", "SQS throttles"),  # whatever its status
        (client_error("InvalidParameterValue", 400), "error", "InvalidParameterValue"),
        (botocore.exceptions.EndpointConnectionError(endpoint_url=URL), "unreachable", "Could not reach SQS"),
        (ValueError("secret-looking text"), "error", "ValueError"),
    ],
)
def test_a_failure_is_named_by_kind_with_what_to_do(exc: BaseException, kind: str, words: str) -> None:
    found, message = queue_problem(exc, URL, "arn:aws:iam::111122223333:role/xpander-controller")
    assert (found, words in message) == (kind, True), message
    assert "secret-looking" not in message


async def test_a_queue_that_fails_is_retried_and_said_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    sqs, meter = Sqs([], failure=client_error("AccessDenied", 403)), Counted()
    queue = RotationQueue(URL, lambda: sqs, rotated=lambda _: "refreshed", meter=meter, retry_base=0.01)
    with caplog.at_level(logging.WARNING):
        await run_until(queue, lambda: len(sqs.calls) >= 4)
    assert meter.queue[:4] == ["denied"] * 4
    assert sum("IAM denies sqs:ReceiveMessage" in r.getMessage() for r in caplog.records) == 1
    sqs.failure = None
    with caplog.at_level(logging.INFO):
        await run_until(queue, lambda: meter.queue[-1:] == [None])
    assert any("Receiving rotation events from" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)


async def test_a_bug_in_handling_one_event_does_not_stall_the_others(caplog: pytest.LogCaptureFixture) -> None:
    sqs, meter = Sqs([[event("v2"), event("v3")]]), Counted()
    seen: list[str] = []

    def rotated(moved: LabelMoved) -> str:
        seen.append(moved.version_id)
        if moved.version_id == "v2":
            raise KeyError("CANARY-in-a-bug")
        return "refreshed"

    queue = RotationQueue(URL, lambda: sqs, rotated=rotated, meter=meter)
    with caplog.at_level(logging.DEBUG):
        await run_until(queue, lambda: len(sqs.deleted) == 2)
    assert seen == ["v2", "v3"] and meter.events == ["refreshed"]
    said = [r.getMessage() for r in caplog.records]
    assert any("Handling a rotation event failed unexpectedly (KeyError" in line for line in said)
    assert not [line for line in said if "CANARY" in line]


async def test_failed_deletes_are_counted_but_do_not_say_the_queue_is_unread(caplog: pytest.LogCaptureFixture) -> None:
    # sqs:DeleteMessage missing from the policy: every batch is received, handled, and not deleted.
    sqs, meter = Sqs([[event("v2")], [event("v3")], [event("v4")]]), Counted()
    sqs.delete_failure = client_error("AccessDenied", 403, "DeleteMessageBatch")
    queue = RotationQueue(URL, lambda: sqs, rotated=lambda _: "refreshed", meter=meter)
    with caplog.at_level(logging.INFO):
        await run_until(queue, lambda: sqs.calls.count("DeleteMessageBatch") == 3)
    assert "delete: denied" in meter.queue and "denied" not in meter.queue  # the gauge stays 1
    said = [r.getMessage() for r in caplog.records]
    assert sum("IAM denies sqs:DeleteMessageBatch" in line for line in said) == 1  # not once per batch
    assert not [line for line in said if "again" in line]  # a receive does not clear a delete's problem
    sqs.delete_failure = None
    sqs.batches.append([event("v5")])
    with caplog.at_level(logging.INFO):
        await run_until(queue, lambda: sqs.deleted)
    assert any("Deleting the handled rotation events of" in r.getMessage() for r in caplog.records)


async def test_what_a_message_says_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    sqs = Sqs([[event("v2\n[2026-01-01 00:00:00,000] kopf [ERROR   ] forged")]])
    queue = RotationQueue(URL, lambda: sqs, rotated=lambda _: "refreshed", meter=Counted())
    with caplog.at_level(logging.DEBUG):
        await run_until(queue, lambda: sqs.deleted)
    lines = [r.getMessage() for r in caplog.records if "Rotation event" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines


@pytest.mark.parametrize(
    ("url", "environ", "region"),
    [
        ("https://sqs.eu-west-1.amazonaws.com/111122223333/q", {}, "eu-west-1"),
        ("https://sqs.cn-north-1.amazonaws.com.cn/111122223333/q", {}, "cn-north-1"),
        ("https://us-east-2.queue.amazonaws.com/111122223333/q", {}, "us-east-2"),
        ("http://127.0.0.1:5000/123456789012/q", {"AWS_REGION": "ap-south-1"}, "ap-south-1"),
        ("http://localhost:5000/123456789012/q", {}, "us-east-1"),
    ],
)
def test_the_queues_region(url: str, environ: dict[str, str], region: str) -> None:
    assert queue_region(url, environ) == region


def test_the_long_poll_is_the_longest_sqs_allows() -> None:
    assert (rotation_queue.WAIT_SECONDS, rotation_queue.MAX_MESSAGES) == (20, 10)
