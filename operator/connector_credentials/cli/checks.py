"""The checks of ``connector-credentials doctor`` (see :mod:`connector_credentials.cli.doctor`), one
function each: pure, they judge what the doctor found (the environment, a token file's bytes, an
error) and say what to fix. The token is decoded for its claims only; it is never quoted.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connector_credentials.adapters.aws.identity import (
    AUTH_TOKEN_FILE_ENV,
    FULL_URI_ENV,
    IRSA,
    POD_IDENTITY,
    ROLE_ARN,
    ROLE_ENV,
    TOKEN_ENV,
    Environ,
    configured,
    neither_configured,
    pod_identity_checks,
)
from connector_credentials.adapters.kube.apiserver import KubeApiError
from connector_credentials.api.models import region_of
from connector_credentials.core.entry import Outcome
from connector_credentials.core.failures import IRSA_CHECKS

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
AUDIENCES = {IRSA: "sts.amazonaws.com", POD_IDENTITY: "pods.eks.amazonaws.com"}
TOKEN_FILES = {IRSA: TOKEN_ENV, POD_IDENTITY: AUTH_TOKEN_FILE_ENV}
#: The kubelet renews a projected token once 80 % of its lifetime has passed: with under a tenth left, it is late.
LATE_FRACTION = 0.1
#: A claim is printed at most this long (the file is not verified: it could hold anything).
MAX_CLAIM = 200
RBAC_FILE = "deploy/sidecar/rbac.yaml"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report. ``credential`` ("namespace/name") and ``reason``: a credential's line."""

    check: str
    result: str
    detail: str
    fix: str | None = None
    credential: str | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        shape: dict[str, Any] = {"check": self.check, "result": self.result, "detail": self.detail, "fix": self.fix}
        if self.credential is not None:
            shape.update(credential=self.credential, reason=self.reason)
        return shape


@dataclass(frozen=True, slots=True)
class Declared:
    """A ConnectorCredential as listed (its raw spec: doctor judges it as the engine would)."""

    namespace: str
    name: str
    spec: Any

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class TokenError(ValueError):
    """The token file does not hold a JWT. The message never quotes the file."""


def token_claims(token: bytes) -> dict[str, Any]:
    """The payload of a JWT, decoded without checking its signature (only its claims are shown)."""
    parts = token.strip().split(b".")
    if len(parts) != 3 or not all(parts):
        raise TokenError("it is not a JWT (three base64url parts separated by dots)")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise TokenError("its payload is not base64url-encoded JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("its payload is not a JSON object")
    return claims


def identity_check(environ: Environ, *, allow_other: bool) -> Check:
    kind = configured(environ)
    if kind == IRSA:
        missing = [name for name in (ROLE_ENV, TOKEN_ENV) if not environ.get(name)]
        if missing:
            return Check("identity", FAIL, f"IRSA is half set up: {' and '.join(missing)} is not set", IRSA_CHECKS)
        return Check("identity", PASS, f"IRSA: {ROLE_ENV} and {TOKEN_ENV} are set")
    if kind == POD_IDENTITY:
        if not environ.get(AUTH_TOKEN_FILE_ENV):
            detail = f"EKS Pod Identity is half set up: {FULL_URI_ENV} is set but {AUTH_TOKEN_FILE_ENV} is not"
            return Check("identity", FAIL, detail, pod_identity_checks(environ))
        return Check(
            "identity",
            PASS,
            f"EKS Pod Identity: {FULL_URI_ENV}={environ[FULL_URI_ENV]} and {AUTH_TOKEN_FILE_ENV} are set",
        )
    if allow_other:
        return Check(
            "identity",
            PASS,
            "no workload identity; CCRED_ALLOW_NON_IRSA_CREDENTIALS=true lets the AWS SDK's default chain "
            "supply credentials",
        )
    detail = f"neither IRSA ({ROLE_ENV}, {TOKEN_ENV}) nor EKS Pod Identity ({FULL_URI_ENV}) is set up in this container"
    return Check("identity", FAIL, detail, neither_configured().message)


def token_check(kind: str, path: str, content: bytes | OSError, now: float) -> Check:
    """The token file of workload identity ``kind``: readable, a JWT, the expected audience, current."""
    where = f"{TOKEN_FILES[kind]}={path}"
    remount = "The kubelet writes this file from the pod's projected token volume; restart the pod to mount it anew."
    if isinstance(content, OSError):
        return Check("token", FAIL, f"{where} cannot be read ({content.strerror or type(content).__name__})", remount)
    if not content.strip():
        return Check("token", FAIL, f"{where} is empty", remount)
    if kind == POD_IDENTITY and (b"\n" in content or b"\r" in content):
        # Sent as-is in the Authorization header, which the SDK refuses with a line break in it.
        return Check("token", FAIL, f"{where} contains a line break", f"It must hold the token only. {remount}")
    try:
        claims = token_claims(content)
    except TokenError as exc:
        return Check("token", FAIL, f"{where}: {exc}", f"It must hold the projected service-account token. {remount}")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else [str(a) for a in aud] if isinstance(aud, list) else []
    subject, issuer = _claim(claims.get("sub")), _claim(claims.get("iss"))
    exp, iat = claims.get("exp"), claims.get("iat")
    problems, fixes = [], []
    expected = AUDIENCES[kind]
    if expected not in audiences:
        problems.append(f"aud is not {expected}")
        volume = "aws-iam-token" if kind == IRSA else "eks-pod-identity-token"
        fixes.append(f"The token must be projected with audience {expected} (the pod's {volume} volume).")
    parts = subject.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not all(parts):
        problems.append("sub is not system:serviceaccount:<namespace>:<service-account>")
        fixes.append("It must be a Kubernetes service-account token.")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        left = exp - now
        lifetime = exp - iat if isinstance(iat, int | float) and not isinstance(iat, bool) and iat < exp else None
        expiry = f"expires {_stamp(exp)} ({'in ' + _span(left) if left > 0 else _span(left) + ' ago'})"
        if left <= 0 or (lifetime is not None and left < LATE_FRACTION * lifetime):
            problems.append("it has expired" if left <= 0 else "it is about to expire and was not renewed")
            fixes.append(
                "The kubelet renews the token before it expires: check the kubelet and the node's clock. " + remount
            )
    else:
        expiry = "no exp claim"
        problems.append("it has no exp claim")
        fixes.append("It must be a projected service-account token (they always expire).")
    shown = ",".join(_claim(a) for a in audiences) or "-"
    detail = f"{where}: aud {shown}, sub {subject or '-'}, iss {issuer or '-'}, {expiry}"
    if problems:
        return Check("token", FAIL, f"{detail}: {'; '.join(problems)}", " ".join(fixes))
    return Check("token", PASS, detail)


def role_check(environ: Environ, kind: str | None) -> Check:
    if kind != IRSA:
        why = "EKS Pod Identity: the role comes from the association" if kind else "no workload identity"
        return Check("role-arn", SKIP, f"{why}, not from {ROLE_ENV}")
    role = environ.get(ROLE_ENV, "")
    if ROLE_ARN.match(role):
        return Check("role-arn", PASS, f"{ROLE_ENV}={role}")
    return Check(
        "role-arn",
        FAIL,
        f"{ROLE_ENV}={role!r} is not an IAM role ARN (arn:aws:iam::<account-id>:role/<name>)",
        "Annotate the service account eks.amazonaws.com/role-arn with the full role ARN, then restart the pod "
        "(IRSA is injected at pod creation).",
    )


def regions_check(declared: Sequence[Declared] | None) -> Check:
    if declared is None:
        return Check("regions", SKIP, "the ConnectorCredentials could not be listed (see kubernetes)")
    if not declared:
        return Check("regions", SKIP, "no ConnectorCredential to read")
    regions = {d.ref: region_of(d.spec.get("secretArn", "")) if isinstance(d.spec, dict) else None for d in declared}
    if missing := [ref for ref, region in regions.items() if region is None]:
        return Check(
            "regions",
            FAIL,
            f"no valid region in the spec.secretArn of {', '.join(missing)}",
            "A secretArn names its secret's region: arn:aws:secretsmanager:<region>:<account-id>:secret:<name>; "
            "copy it from the secret's page in the Secrets Manager console.",
        )
    used = sorted({region for region in regions.values() if region})
    return Check("regions", PASS, f"secrets are read in {', '.join(used)} (from their ARNs, not AWS_REGION)")


def kube_failure(exc: BaseException, namespaces: list[str] | None) -> Check:
    """Why the ConnectorCredentials could not be listed, and the RBAC (or setup) that fixes it."""
    where = f"namespace {', '.join(namespaces)}" if namespaces else "every namespace"
    if isinstance(exc, KubeApiError) and exc.status == 403:
        if namespaces is None:
            fix = (
                "Listing every namespace needs a ClusterRole; the shipped RBAC is a Role in the operator's namespace "
                f"({RBAC_FILE}): pass -n NAMESPACE (the shipped sidecar sets CCRED_NAMESPACE to its own namespace)."
            )
        else:
            fix = (
                f"Bind the operator's service account, in {where}, to a Role granting get, list, watch on "
                "connectorcredentials and patch on connectorcredentials/status (API group connectors.xpander.ai) "
                f"and create on events: {RBAC_FILE} (kubectl apply -k deploy)."
            )
        return Check(
            "kubernetes", FAIL, f"the API server refused to list ConnectorCredentials in {where}: {exc.message}", fix
        )
    if isinstance(exc, KubeApiError) and exc.status == 404:
        return Check(
            "kubernetes", FAIL, f"the API does not serve ConnectorCredentials ({exc})", "kubectl apply -f crds/"
        )
    if isinstance(exc, KubeApiError) and exc.status == 401:
        return Check(
            "kubernetes",
            FAIL,
            f"the API server did not accept the credentials ({exc})",
            "In a pod: the service account token must be mounted (automountServiceAccountToken); elsewhere: "
            "renew the kubeconfig's credentials.",
        )
    text = (str(exc).splitlines() or [""])[0][:300]
    return Check(
        "kubernetes",
        FAIL,
        f"listing ConnectorCredentials in {where} failed: {type(exc).__name__}: {text}",
        "Run doctor in the operator's pod (its service account), or set KUBECONFIG; check that the API server "
        "is reachable from here.",
    )


def credential_line(item: Declared, outcome: Outcome) -> Check:
    if outcome.ready:
        return Check("credential", PASS, outcome.message, credential=item.ref, reason=outcome.reason)
    fix = f"See docs/troubleshooting.md#{outcome.reason.lower()}."
    return Check("credential", FAIL, outcome.message, fix, credential=item.ref, reason=outcome.reason)


def select(items: Sequence[dict[str, Any]], names: Sequence[str]) -> tuple[list[Declared], list[str]]:
    """The listed credentials that ``names`` (NAME or NAMESPACE/NAME; none: all) ask for, and the names not found."""
    declared = []
    for item in items:
        meta = item.get("metadata") or {}
        if meta.get("name") and meta.get("namespace") and not meta.get("deletionTimestamp"):
            declared.append(Declared(str(meta["namespace"]), str(meta["name"]), item.get("spec")))
    declared.sort(key=lambda d: (d.namespace, d.name))
    if not names:
        return declared, []
    chosen = [d for d in declared if d.name in names or d.ref in names]
    missing = [name for name in dict.fromkeys(names) if not any(name in (d.name, d.ref) for d in chosen)]
    return chosen, missing


def _claim(value: Any) -> str:
    text = value if isinstance(value, str) else "" if value is None else json.dumps(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_CLAIM else text[: MAX_CLAIM - 3] + "..."


def _stamp(seconds: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f}"


def _span(seconds: float) -> str:
    whole = int(abs(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
