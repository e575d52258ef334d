"""Projected service-account tokens for tests: JWTs with real-looking claims and no real signature.

Nothing here verifies them (moto, the Pod Identity stand-in, the operator and doctor only decode
the claims), so one unsigned shape serves every test.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

ISSUER = "https://oidc.eks.us-east-1.amazonaws.com/id/TEST"
SUBJECT = "system:serviceaccount:xpander:xpander-controller"


def _part(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def service_account_token(audience: str = "sts.amazonaws.com", **claims: Any) -> str:
    """A token as the kubelet projects it (valid for a day from now); ``claims`` override or add."""
    now = int(time.time())
    body = {"aud": [audience], "iss": ISSUER, "sub": SUBJECT, "iat": now, "exp": now + 86400, **claims}
    return unsigned_jwt(body)


def unsigned_jwt(claims: dict[str, Any]) -> str:
    return f"{_part({'alg': 'RS256', 'kid': 'test'})}.{_part(claims)}.{_part({'sig': 'not-checked'})}"
