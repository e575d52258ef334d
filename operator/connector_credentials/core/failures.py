"""What a failed check of AWS means, in the words of a condition: :class:`AwsFailure` (a reason,
and a message that says what to check next) and :func:`scrub`, which keeps request IDs and anything
credential-like out of those messages.

Pure: how an SDK exception becomes an :class:`AwsFailure` is the aws adapter's business
(:mod:`connector_credentials.adapters.aws.errors`); the core only ever sees the result.
"""

from __future__ import annotations

import re

from connector_credentials.api.conditions import Reason

MAX_AWS_MESSAGE = 600

#: Error codes AWS services use for throttling (the metrics' ``throttled`` outcome too).
THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "PriorRequestNotComplete",
    }
)
_SCRUB = (
    (re.compile(r"\s*\(?Request ?ID:? ?[A-Za-z0-9-]+\)?", re.IGNORECASE), ""),
    (re.compile(r"Credential=[^\s,]+"), "Credential=<redacted>"),
    (re.compile(r"Signature=[^\s,]+"), "Signature=<redacted>"),
    (re.compile(r"(X-Amz-Security-Token|SessionToken)[=:]\s*[^\s,]+", re.IGNORECASE), r"\1=<redacted>"),
    # The STS session name differs per replica and per refresh; without it, replicas agree.
    (re.compile(r"(:assumed-role/[\w+=,.@-]+)/[\w+=,.@-]+"), r"\1"),
)


class AwsFailure(Exception):
    """A check failed; ``reason`` is the condition reason, ``message`` says what to fix."""

    def __init__(self, reason: Reason, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Usually the reason decides; a few answers (an expired token) name a reason that is
        # normally final but clear up by themselves, and are retried soon.
        self._transient = transient

    @property
    def transient(self) -> bool:
        return self.reason.transient if self._transient is None else self._transient


def scrub(text: str) -> str:
    """Strip request IDs and anything credential-like from an AWS message; bound its length."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_AWS_MESSAGE else text[: MAX_AWS_MESSAGE - 3] + "..."


IRSA_CHECKS = (
    "Check that the pod's service account is annotated eks.amazonaws.com/role-arn with the full role ARN "
    "(arn:aws:iam::<account-id>:role/<name>), that the pod was restarted after the annotation was added "
    "(IRSA is injected only at pod creation), and that the EKS cluster has an IAM OIDC provider "
    "(aws eks describe-cluster --query cluster.identity.oidc.issuer)."
)
