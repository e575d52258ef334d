"""What the socket is answered from what the engine holds: pure functions of an entry and the time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from connector_credentials.api.conditions import PENDING_REASON, find_condition
from connector_credentials.api.wire import rfc3339
from connector_credentials.core.entry import Entry, Served

SHUTTING_DOWN = "ShuttingDown"


def answer(entry: Entry, now: float) -> Served:
    """The value if one is held; else the last verdict (502 permanent, 503 transient or pending)."""
    outcome, held = entry.schedule.outcome, entry.held
    if held.value is not None and entry.api.spec is not None:
        return Served(
            200,
            value=held.value,
            body=held.body,
            version_id=held.version_id,
            arn=entry.api.spec.secret_arn,
            fetched_at=held.fetched_at,
        )
    if outcome is None:
        return Served(503, reason=PENDING_REASON, message="Not checked yet; retry shortly.", retry_after=1)
    if outcome.transient:
        retry = max(1, int(entry.schedule.due - now) + 1)
        return Served(503, reason=outcome.reason, message=outcome.message, retry_after=min(retry, 300))
    return Served(502, reason=outcome.reason, message=outcome.message)


def answer_undeclared(namespace: str, name: str, *, synced: bool) -> Served:
    """No such credential: 404, unless the declared ones are not all loaded yet (503, retry)."""
    if not synced:
        return Served(
            503,
            reason=PENDING_REASON,
            message="The operator is still loading the declared credentials; retry shortly.",
            retry_after=1,
        )
    return Served(
        404,
        reason="NotFound",
        message=f"No ConnectorCredential {namespace}/{name} is declared (or it is in a namespace this "
        "operator does not watch).",
    )


def answer_draining(entry: Entry, now: float, *, refresh: bool) -> Served:
    """While the operator drains: what it holds, as it is; nothing that needs AWS."""
    outcome = entry.schedule.outcome
    if not refresh and (entry.held.value is not None or (outcome is not None and not outcome.transient)):
        return answer(entry, now)
    return Served(
        503,
        reason=SHUTTING_DOWN,
        message="The operator is shutting down and no longer reads from AWS; retry on the next replica.",
        retry_after=1,
    )


def describe(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """The credentials and their readiness, never values."""
    result = []
    for entry in entries:
        outcome = entry.schedule.outcome
        ready = find_condition(entry.api.live_status.get("conditions")) if outcome is None else None
        result.append(
            {
                "namespace": entry.namespace,
                "name": entry.name,
                "arn": entry.api.spec.secret_arn if entry.api.spec else None,
                "ready": bool(outcome.ready) if outcome else (ready or {}).get("status") == "True",
                "reason": outcome.reason if outcome else (ready or {}).get("reason", PENDING_REASON),
                "message": outcome.message if outcome else (ready or {}).get("message", ""),
                "versionId": entry.held.version_id,
                "fetchedAt": rfc3339(entry.held.fetched_at),
            }
        )
    return result
