"""Condition reasons and the pure rules for writing Kubernetes-standard conditions."""

from __future__ import annotations

import datetime
from enum import StrEnum
from typing import Any

READY = "Ready"


class Reason(StrEnum):
    """The fixed vocabulary of the ``Ready`` condition's reasons."""

    ACCESS_VERIFIED = "AccessVerified"
    INVALID_SPEC = "InvalidSpec"
    IRSA_NOT_CONFIGURED = "IRSANotConfigured"
    POD_IDENTITY_FAILED = "PodIdentityFailed"
    ASSUME_ROLE_FAILED = "AssumeRoleFailed"
    ROLE_NOT_ALLOWED = "RoleNotAllowed"
    ACCESS_DENIED = "AccessDenied"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_SCHEDULED_FOR_DELETION = "SecretScheduledForDeletion"
    DECRYPTION_FAILED = "DecryptionFailed"
    JSON_KEY_NOT_FOUND = "JsonKeyNotFound"
    THROTTLED = "Throttled"
    AWS_UNAVAILABLE = "AWSUnavailable"

    @property
    def transient(self) -> bool:
        """Transient reasons are retried with backoff; the others wait for refreshInterval."""
        return self in (Reason.THROTTLED, Reason.AWS_UNAVAILABLE)


#: Reason used for the condition while a credential has not been checked yet.
PENDING_REASON = "Pending"

#: Event reasons that are not condition reasons.
EVENT_ROTATED = "Rotated"


def now_rfc3339(now: datetime.datetime | None = None) -> str:
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(conditions: Any, type_: str = READY) -> dict[str, Any] | None:
    if not isinstance(conditions, list):
        return None
    for condition in conditions:
        if isinstance(condition, dict) and condition.get("type") == type_:
            return condition
    return None


def set_condition(
    conditions: Any,
    *,
    status: bool,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: str,
    type_: str = READY,
) -> list[dict[str, Any]]:
    """Return a new condition list with ``type_`` set.

    ``lastTransitionTime`` moves only when the condition's status changes, so replicas
    and repeated checks that reach the same verdict write identical conditions.
    """
    existing = [c for c in conditions if isinstance(c, dict)] if isinstance(conditions, list) else []
    previous = find_condition(existing, type_)
    status_text = "True" if status else "False"
    if previous is not None and previous.get("status") == status_text and previous.get("lastTransitionTime"):
        transition = str(previous["lastTransitionTime"])
    else:
        transition = now
    condition: dict[str, Any] = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        condition["observedGeneration"] = observed_generation
    others = [c for c in existing if c.get("type") != type_]
    return [*others, condition]


def same_condition(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two conditions say the same thing (ignores nothing but key order)."""
    if a is None or b is None:
        return a is b
    keys = ("type", "status", "reason", "message", "lastTransitionTime", "observedGeneration")
    return all(a.get(key) == b.get(key) for key in keys)
