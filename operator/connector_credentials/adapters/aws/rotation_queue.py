"""The rotation queue: Secrets Manager's ``Secret Label Updated`` events, long-polled from SQS
(``CCRED_ROTATION_QUEUE_URL``; docs/install-eks.md, "Rotation in seconds").

One task polls (20 s waits, up to 10 messages) with the operator's workload identity, hands each
event to the engine (which plans the reads), and deletes what it handled. Handling cannot fail
on a message: what is not an event is counted, logged once per kind without its body, and
deleted. A queue that cannot be read is logged (when the problem changes, and every 10 minutes
while it lasts), counted, and retried with backoff; polling keeps every credential fresh
meanwhile, so the queue only makes rotation fast.

The receive call waits up to 20 s in a daemon thread of its own, not in the readers' pool: it
must not hold a read's slot, nor hold the process's exit back for 20 s at SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import botocore.exceptions

from connector_credentials.core.failures import THROTTLE_CODES, AwsFailure, scrub
from connector_credentials.core.ports import Meter
from connector_credentials.core.rotation import MALFORMED, REFRESHED, LabelMoved, Refused, parse_event
from connector_credentials.core.supervise import log_bug
from connector_credentials.core.timing import capped_doubling

logger = logging.getLogger(__name__)

#: SQS's longest long poll: an idle queue costs one request per 20 s (about 130,000 a month).
WAIT_SECONDS = 20
MAX_MESSAGES = 10
#: While the queue cannot be read: the longest wait between attempts (CCRED_BACKOFF_CAP, if lower),
#: and between log lines.
RETRY_CAP = 60.0
SAY_AGAIN_AFTER = 600.0
STATEMENT = "ReceiveRotationEvents statement of deploy/iam/policy.json"
#: What that statement must allow: the calls made here and by doctor (DeleteMessageBatch is
#: authorized as sqs:DeleteMessage).
IAM_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")
#: The two calls whose failures are told apart: only receiving says whether events arrive.
RECEIVE, DELETE = "receive", "delete"
_MISSING_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"})
_HOST_REGION = re.compile(r"^(?:sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?|([a-z0-9-]+)\.queue\.amazonaws\.com)$")

T = TypeVar("T")


def queue_region(url: str, environ: Mapping[str, str]) -> str:
    """The queue's region: from its URL's host (sqs.REGION.amazonaws.com), else AWS_REGION (a
    local endpoint's URLs name none), else us-east-1."""
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    match = _HOST_REGION.match(host)
    if match:
        return match.group(1) or match.group(2)
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def queue_problem(exc: BaseException, url: str, role: str | None) -> tuple[str, str]:
    """Why the queue could not be read (the ``reason`` label) and what to do, in one line."""
    who = f"role {role}" if role else "the operator's identity"
    if isinstance(exc, AwsFailure):
        return "identity", f"{exc.reason}: {exc.message}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code, said = str(error.get("Code", "Unknown")), scrub(str(error.get("Message", "")))[:300]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        operation = f"sqs:{exc.operation_name}"
        if code in THROTTLE_CODES or code in ("OverLimit", "KmsThrottled") or status == 429:
            return "throttled", f"SQS throttles {operation} on {url} ({code})"
        if "AccessDenied" in code or status == 403:
            kms = " (and kms:Decrypt on the queue's key, if it is encrypted with one of yours)" if "KMS" in code else ""
            return "denied", (
                f"IAM denies {operation} on {url} to {who} ({code}): add the {STATEMENT}{kms}. AWS said: {said}"
            )
        if code in _MISSING_CODES:
            return "missing", f"the queue {url} does not exist (CCRED_ROTATION_QUEUE_URL): check its URL and region"
        return "error", f"SQS refused {operation} on {url}: {code}: {said}"
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        return "unreachable", f"Could not reach SQS for {url}: {type(exc).__name__}: {scrub(str(exc))[:300]}"
    return "error", f"Unexpected error reading {url}: {type(exc).__name__}"


class RotationQueue:
    """Long-polls the queue, hands events to ``rotated`` (the engine), deletes what it handled."""

    def __init__(
        self,
        url: str,
        client: Callable[[], Any],
        *,
        rotated: Callable[[LabelMoved], str],
        meter: Meter,
        role: str | None = None,
        retry_base: float = 1.0,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        self._url = url
        #: The SQS client (made on first use, in the polling thread: making one checks the identity).
        self._client = client
        self._rotated = rotated
        self._meter = meter
        self._role = role
        self._retry_base, self._retry_cap = retry_base, min(retry_cap, RETRY_CAP)
        #: Kinds of refused messages logged already (once per kind: a flood must not flood the log).
        self._said: set[str] = set()
        #: The problem logged last (kind, when), per call: a failed delete says nothing of receiving.
        self._problems: dict[str, tuple[str, float]] = {}

    async def run(self, *, stopping: Callable[[], bool] = lambda: False) -> None:
        """Poll until cancelled (or until ``stopping()``: the operator drains; messages received then
        are left to the queue, which hands them to another replica once they become visible again)."""
        logger.info("Receiving rotation events from %s.", self._url)
        failures = 0
        while not stopping():
            try:
                messages = await _off_loop(self._receive)
            except Exception as exc:  # noqa: BLE001 - every failure is reported and retried: polling covers meanwhile
                failures += 1
                self._failed(RECEIVE, exc)
                await asyncio.sleep(capped_doubling(self._retry_base, self._retry_cap, failures))
                continue
            failures = 0
            self._succeeded(RECEIVE)
            if stopping():
                return
            handled = [(str(i), m["ReceiptHandle"]) for i, m in enumerate(messages) if self._handle(m)]
            if handled:
                try:
                    await _off_loop(functools.partial(self._delete, handled))
                except Exception as exc:  # noqa: BLE001 - handled again when it reappears: reads are idempotent
                    self._failed(DELETE, exc)
                else:
                    self._succeeded(DELETE)

    def _receive(self) -> list[dict[str, Any]]:
        answer = self._client().receive_message(
            QueueUrl=self._url, MaxNumberOfMessages=MAX_MESSAGES, WaitTimeSeconds=WAIT_SECONDS
        )
        return [m for m in answer.get("Messages") or () if isinstance(m, dict) and m.get("ReceiptHandle")]

    def _delete(self, handled: list[tuple[str, str]]) -> None:
        entries = [{"Id": ident, "ReceiptHandle": handle} for ident, handle in handled]
        answer = self._client().delete_message_batch(QueueUrl=self._url, Entries=entries)
        for failed in answer.get("Failed") or ():
            logger.warning(
                "SQS did not delete a handled rotation event (%s); it is handled again when it reappears.",
                failed.get("Code", "Unknown"),
            )

    def _handle(self, message: dict[str, Any]) -> bool:
        """Hand one message's event to the engine; ``True``: delete it (always, bar a bug here)."""
        try:
            event = parse_event(message.get("Body") or "")
        except Refused as refused:
            self._meter.rotation_event(refused.outcome)
            if refused.kind not in self._said:
                self._said.add(refused.kind)
                how = "malformed" if refused.outcome == MALFORMED else "not a Secret Label Updated event"
                logger.warning(
                    "Deleted a message of the rotation queue: %s (%s). Further ones of this kind are counted "
                    "(ccred_rotation_events_total) but not logged.",
                    how,
                    refused.kind,
                )
            return True
        try:
            outcome = self._rotated(event)
        except Exception as exc:  # noqa: BLE001 - the next messages must not wait on it; polling reads this one
            log_bug(logger, "Handling a rotation event", exc)
            return True
        self._meter.rotation_event(outcome)
        log = logger.info if outcome == REFRESHED else logger.debug
        # %r: the label and version come from the message, and must not forge log lines.
        log("Rotation event: %r of %s moved to version %r: %s.", event.label, event.arn.arn, event.version_id, outcome)
        return True

    def _succeeded(self, call: str) -> None:
        if call == RECEIVE:
            self._meter.rotation_queue(None)
        if self._problems.pop(call, None) is not None:
            what = "Receiving rotation events from" if call == RECEIVE else "Deleting the handled rotation events of"
            logger.info("%s %s again.", what, self._url)

    def _failed(self, call: str, exc: BaseException) -> None:
        kind, message = queue_problem(exc, self._url, self._role)
        self._meter.rotation_queue(kind, receive=call == RECEIVE)
        now = time.monotonic()
        said = self._problems.get(call)
        if said is None or said[0] != kind or now - said[1] >= SAY_AGAIN_AFTER:
            self._problems[call] = (kind, now)
            logger.warning("Rotation queue: %s; polling keeps every credential fresh meanwhile.", message)


def _off_loop(call: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``call`` in a daemon thread of its own; its result (or exception) in a future of the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # cancelled meanwhile (shutdown)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = call(), None
        except Exception as exc:  # noqa: BLE001 - handed to the loop
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop closed while this call waited: nobody waits for it

    threading.Thread(target=work, name="ccred-rotation-queue", daemon=True).start()
    return future
