"""Which cross-account roles a credential may name (``CCRED_ASSUMABLE_ROLES``): decided without asking AWS."""

from __future__ import annotations

import re
from collections.abc import Sequence

from connector_credentials.api.conditions import Reason
from connector_credentials.core.failures import AwsFailure

__all__ = ["RoleAllowlist"]


class RoleAllowlist:
    """``CCRED_ASSUMABLE_ROLES``: ARN patterns where ``*`` stands for any characters. Empty: none."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = [re.compile(".*".join(re.escape(part) for part in pattern.split("*"))) for pattern in patterns]

    def allows(self, role_arn: str) -> bool:
        return any(pattern.fullmatch(role_arn) for pattern in self._compiled)

    def refusal(self, role_arn: str) -> AwsFailure | None:
        """Why this role may not be assumed (``None``: it may). Decided without asking AWS."""
        if self.allows(role_arn):
            return None
        allowed = ", ".join(self.patterns) if self.patterns else "none: CCRED_ASSUMABLE_ROLES is empty"
        return AwsFailure(
            Reason.ROLE_NOT_ALLOWED,
            f"spec.roleArn {role_arn} is not in the operator's allowlist of assumable roles ({allowed}). The "
            "operator does not assume it and did not call AWS. Ask the platform team to add the role (or a "
            "pattern such as arn:aws:iam::<account-id>:role/<prefix>*) to CCRED_ASSUMABLE_ROLES, or remove "
            "spec.roleArn to read with the operator's own identity.",
        )
