"""What a check concludes from what it found, for a credential holding no verified value.

Pure, and shared: the engine writes these to status, and ``connector-credentials doctor`` prints
them, so that both word a verdict exactly alike.
"""

from __future__ import annotations

from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import ConnectorCredentialSpec, format_duration
from connector_credentials.api.values import JsonKeyError
from connector_credentials.core.entry import Outcome
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.status import stable_identity

__all__ = ["failed_outcome", "invalid_spec_outcome", "json_key_outcome", "verified_outcome"]


def invalid_spec_outcome(error: str) -> Outcome:
    """The spec did not parse (``error``: :class:`InvalidSpecError`'s text)."""
    return Outcome(False, Reason.INVALID_SPEC, f"Invalid spec: {error}. Fix the resource.")


def failed_outcome(failure: AwsFailure) -> Outcome:
    """A failed read (or a role refused before any read), with no verified value to fall back on."""
    return Outcome(False, failure.reason, failure.message, transient=failure.transient)


def json_key_outcome(spec: ConnectorCredentialSpec, exc: JsonKeyError) -> Outcome:
    """The secret was read, but ``spec.jsonKey`` does not apply to its content."""
    return Outcome(
        False,
        Reason.JSON_KEY_NOT_FOUND,
        f"Read {spec.arn.arn} but jsonKey {spec.json_key!r} does not apply: {exc}. "
        "Fix spec.jsonKey or the secret's content.",
    )


def verified_outcome(spec: ConnectorCredentialSpec, identity: str, interval: float) -> Outcome:
    """The secret was read as ``identity`` and the value extracted."""
    selector = f"versionId {spec.version_id}" if spec.version_id else f"stage {spec.effective_stage}"
    key_text = f", key {spec.json_key!r}" if spec.json_key else ""
    return Outcome(
        True,
        Reason.ACCESS_VERIFIED,
        f"Read {spec.arn.arn} ({selector}{key_text}) as {stable_identity(identity)}; re-checked every "
        f"{format_duration(interval)}.",
    )


def still_served_outcome(failure: AwsFailure, staleness: float) -> Outcome:
    """A transient failure while a verified value is young enough to serve: still Ready."""
    return Outcome(
        True,
        Reason.ACCESS_VERIFIED,
        f"The last check failed transiently ({failure.reason}): {failure.message} The value verified "
        f"before is still served, for at most {format_duration(staleness)} past its scheduled refresh.",
        transient=True,
    )
