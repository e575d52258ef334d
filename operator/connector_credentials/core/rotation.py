"""Secrets Manager's ``Secret Label Updated`` events, as EventBridge delivers them to SQS: parsed, or
refused with the kind of what was wrong (docs/design.md, "Rotation in seconds").

Secrets Manager publishes the event to the default bus whenever a staging label moves to another
version (every label but ``AWSPENDING`` and ``AWSPREVIOUS``); an EventBridge rule with an SQS target
makes the event's JSON the message body. Nothing here trusts the body: it comes from whoever may
send to the queue. A refusal names its kind only, never the body (it could hold anything).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from connector_credentials.api.models import DEFAULT_VERSION_STAGE, InvalidSpecError, SecretArn
from connector_credentials.core.reads import ReadKey

#: An event is about 600 bytes; SQS allows 256 KiB. Anything this large is not one of ours.
MAX_EVENT_BYTES = 16 * 1024
DETAIL_TYPE = "Secret Label Updated"
SOURCE = "aws.secretsmanager"

# What became of an event (the ``outcome`` label of ccred_rotation_events_total).
REFRESHED = "refreshed"  # a read of the new version was planned for every credential that reads it
CURRENT = "current"  # every credential that reads it holds that version already
DEFERRED = "deferred"  # the credentials are backing off after failures: their retry reads it
UNDECLARED = "undeclared"  # no credential reads that secret with that label
IGNORED = "ignored"  # another event (another detail-type or source) that the rule let through
MALFORMED = "malformed"  # not an event: not JSON, the wrong shape, or oversized
OUTCOMES = (REFRESHED, CURRENT, DEFERRED, UNDECLARED, IGNORED, MALFORMED)


class Refused(ValueError):
    """A message that is not a ``Secret Label Updated`` event; ``kind`` says why, ``outcome`` how it counts."""

    def __init__(self, kind: str, outcome: str = MALFORMED) -> None:
        super().__init__(kind)
        self.kind, self.outcome = kind, outcome


@dataclass(frozen=True, slots=True)
class LabelMoved:
    """A staging label of a secret moved to a version."""

    arn: SecretArn
    #: The secret's name without the 6-character suffix (what an ARN given without suffix names).
    name: str
    label: str
    version_id: str
    #: When Secrets Manager published it (whole seconds), if the event says.
    time: datetime.datetime | None

    def moves(self, key: ReadKey) -> bool:
        """Whether this moved what ``key`` reads: that secret (by its full ARN, or by name for an ARN
        given without its suffix) through that label; a pinned versionId never moves."""
        if key.version_id is not None or (key.stage or DEFAULT_VERSION_STAGE) != self.label:
            return False
        mine, theirs = key.arn, self.arn
        if (mine.partition, mine.region, mine.account) != (theirs.partition, theirs.region, theirs.account):
            return False
        return mine.name in (theirs.name, self.name)


def parse_event(body: str | bytes) -> LabelMoved:
    """The event in an SQS message body; :class:`Refused` (with its kind) if it is not one."""
    if len(body) > MAX_EVENT_BYTES:
        raise Refused("oversized")
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[" * 16384 nests too deep
        raise Refused("not-json") from None
    if not isinstance(event, dict):
        raise Refused("not-an-object")
    if event.get("source") != SOURCE or event.get("detail-type") != DETAIL_TYPE:
        raise Refused("another-event", IGNORED)
    detail, resources = event.get("detail"), event.get("resources")
    if not isinstance(detail, dict) or not isinstance(resources, list) or len(resources) != 1:
        raise Refused("wrong-shape")
    name, label, version_id = (_text(detail.get(field)) for field in ("name", "labelUpdated", "versionId"))
    if not (name and label and version_id and isinstance(resources[0], str)):
        raise Refused("wrong-shape")
    try:
        arn = SecretArn.parse(resources[0])
    except InvalidSpecError:
        raise Refused("wrong-shape") from None
    return LabelMoved(arn, name, label, version_id, _time(event.get("time")))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 2048 else None


def _time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
