"""The BatchGetSecretValue side of ``tests.support.awsproxy``: per-secret answers in one response.

The semantics are in that module's docstring; this one holds the pieces that look inside the
batch: which ids a request names, the reduced request forwarded upstream, and the response with
the injected ``Errors`` entries merged in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

READ_ACTION = "GetSecretValue"
BATCH_ACTION = "BatchGetSecretValue"
READ_ACTIONS = frozenset({READ_ACTION, BATCH_ACTION})
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"

Reply = tuple[int, dict[str, str], bytes]  # status, headers, body


def action_matches(rule_action: str | None, action: str | None) -> bool:
    """A rule for GetSecretValue covers every read; one for BatchGetSecretValue only batches."""
    if rule_action is None or rule_action == action:
        return True
    return rule_action == READ_ACTION and action == BATCH_ACTION


def secret_id_list(body: bytes) -> list[str] | None:
    """The request's ``SecretIdList``, or None when it has none (``Filters``) or is not well formed."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return None
    ids = payload.get("SecretIdList") if isinstance(payload, dict) else None
    if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
        return None
    return ids


class Answer(Protocol):
    """What a per-secret rule says about one id (``tests.support.awsproxy.Rule`` is one)."""

    @property
    def error_code(self) -> str: ...
    @property
    def message(self) -> str: ...


def split(ids: list[str], answers: Sequence[Answer | None]) -> tuple[list[str], list[dict[str, str]]]:
    """The ids left to forward, and an ``Errors`` entry for each id a rule answered (in request order).

    An entry is what Secrets Manager reports for a secret it could not return; the rule's message is
    formatted with ``action="GetSecretValue"`` and the id.
    """
    keep: list[str] = []
    errors: list[dict[str, str]] = []
    for secret_id, answer in zip(ids, answers, strict=True):
        if answer is None:
            keep.append(secret_id)
        else:
            message = answer.message.format(action=READ_ACTION, secret_id=secret_id)
            errors.append({"SecretId": secret_id, "ErrorCode": answer.error_code, "Message": message})
    return keep, errors


def reduced_body(body: bytes, keep: list[str]) -> bytes:
    """The request body with only ``keep`` left in ``SecretIdList`` (every other field as it was)."""
    payload: dict[str, Any] = json.loads(body)
    payload["SecretIdList"] = keep
    return json.dumps(payload).encode()


def answered(errors: list[dict[str, str]], request_id: str) -> Reply:
    """The response to a batch whose every id was answered by a rule (nothing was forwarded)."""
    body = json.dumps({"SecretValues": [], "Errors": errors}).encode()
    return 200, {"Content-Type": JSON_CONTENT_TYPE, "x-amzn-RequestId": request_id}, body


def merged(reply: Reply, errors: list[dict[str, str]]) -> Reply:
    """Upstream's answer to the reduced batch plus the injected ``errors`` after its own.

    Anything but a 200 with a JSON object (an upstream error, the proxy's 502) passes through as is.
    """
    status, headers, payload = reply
    if status != 200:
        return reply
    try:
        document = json.loads(payload)
    except ValueError:
        return reply
    if not isinstance(document, dict):
        return reply
    own = document.get("Errors")
    document["Errors"] = [*(own if isinstance(own, list) else []), *errors]
    return status, headers, json.dumps(document).encode()
