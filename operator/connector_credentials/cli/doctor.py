"""``connector-credentials doctor``: check, in order, everything a credential's verdict depends on.

The checks (see docs/reference.md#doctor): the workload identity's variables, its token's claims,
``AWS_ROLE_ARN``, the regions, STS ``GetCallerIdentity``, the Kubernetes listing, then one read per
credential, judged by the engine's own verdict functions so that doctor says what the status says.
:func:`diagnose` is the order and the SKIP rules, over a :class:`Probe` that does the I/O.

Nothing here prints a secret value or a token: a token is decoded for its claims only, a value is
extracted (to judge ``jsonKey``) and dropped, and it is known to the redacting log filter meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from connector_credentials.adapters.aws.identity import Environ, configured
from connector_credentials.api.models import ConnectorCredentialSpec, InvalidSpecError, parse_spec, region_of
from connector_credentials.api.values import JsonKeyError, NeedleIndex, extract
from connector_credentials.cli.checks import (
    FAIL,
    PASS,
    SKIP,
    TOKEN_FILES,
    Check,
    Declared,
    credential_line,
    identity_check,
    kube_failure,
    regions_check,
    role_check,
    select,
    token_check,
)
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.allowlist import RoleAllowlist
from connector_credentials.core.entry import Outcome
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import FetchedSecret
from connector_credentials.core.status import stable_identity
from connector_credentials.core.verdicts import (
    failed_outcome,
    invalid_spec_outcome,
    json_key_outcome,
    verified_outcome,
)

__all__ = ["FAIL", "PASS", "SKIP", "Check", "LiveProbe", "Probe", "as_document", "as_text", "diagnose", "run"]

MAX_TOKEN_BYTES = 65536
DEFAULT_STS_REGION = "us-east-1"


class Probe(Protocol):
    """The I/O doctor needs; each method raises what the product's own code raises."""

    @property
    def environ(self) -> Environ: ...

    def read_token(self, path: str) -> bytes: ...  # OSError

    def list_credentials(self, namespaces: list[str] | None) -> list[dict[str, Any]]: ...  # KubeApiError, ...

    def caller_identity(self, region: str) -> str: ...  # AwsFailure

    def read(self, spec: ConnectorCredentialSpec) -> tuple[str, FetchedSecret]: ...  # AwsFailure

    def rotation_queue(self, url: str) -> int: ...  # messages waiting; botocore's errors, AwsFailure

    @property
    def credential_source(self) -> str | None: ...


# --- verdicts: the engine's own ---------------------------------------------------------------


def credential_verdict(item: Declared, roles: RoleAllowlist) -> Outcome | ConnectorCredentialSpec:
    """The verdict reached without AWS (an invalid spec, a role not allowed), else the spec to read."""
    try:
        spec = parse_spec(item.spec)
    except InvalidSpecError as exc:
        return invalid_spec_outcome(str(exc))
    if spec.role is not None and (refusal := roles.refusal(spec.role.arn)) is not None:
        return failed_outcome(refusal)
    return spec


def read_verdict(
    spec: ConnectorCredentialSpec, probe: Probe, default_interval: float, redaction: NeedleIndex
) -> Outcome:
    """Read once and judge it as the engine's check does (no verified value held before)."""
    try:
        identity, fetched = probe.read(spec)
        value = extract(fetched.raw, spec.json_key)
    except AwsFailure as failure:
        return failed_outcome(failure)
    except JsonKeyError as exc:
        return json_key_outcome(spec, exc)
    redaction.add(value)  # should anything log it from here on, it is masked
    return verified_outcome(spec, identity, spec.refresh_seconds(default_interval))


# --- the order, and what a failure makes impossible -------------------------------------------------


def diagnose(
    probe: Probe,
    *,
    namespaces: list[str] | None,
    names: Sequence[str] = (),
    allow_other: bool = False,
    roles: RoleAllowlist | None = None,
    default_interval: float = 300.0,
    redaction: NeedleIndex | None = None,
    now: float | None = None,
    rotation_queue: str | None = None,
) -> list[Check]:
    """Every check, in the documented order. A check that cannot run for an earlier failure is SKIP."""
    environ, roles = probe.environ, roles or RoleAllowlist(())
    now = datetime.datetime.now(datetime.UTC).timestamp() if now is None else now
    kind = configured(environ)
    identity = identity_check(environ, allow_other=allow_other)
    if identity.result == FAIL:
        token = Check("token", SKIP, "identity failed: no token to check")
        role = Check("role-arn", SKIP, "identity failed")
    elif kind is None:
        token = Check("token", SKIP, "no workload identity token")
        role = role_check(environ, kind)
    else:
        path = environ[TOKEN_FILES[kind]]
        try:
            content: bytes | OSError = probe.read_token(path)
        except OSError as exc:
            content = exc
        token, role = token_check(kind, path, content, now), role_check(environ, kind)

    declared: list[Declared] | None = None
    missing: list[str] = []
    try:
        declared, missing = select(probe.list_credentials(namespaces), names)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as the check's verdict
        kube = kube_failure(exc, namespaces)
    else:
        where = f"namespace {', '.join(namespaces)}" if namespaces else "every namespace"
        kube = Check("kubernetes", PASS, f"listed ConnectorCredentials in {where}: {len(declared)} to check")

    blocked = next((c.check for c in (identity, token, role) if c.result == FAIL), None)
    if blocked is not None:
        sts = Check("sts", SKIP, f"{blocked} failed: no AWS call can succeed")
    else:
        regions = [
            r for d in declared or () if isinstance(d.spec, dict) and (r := region_of(d.spec.get("secretArn", "")))
        ]
        region = (regions or [environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or DEFAULT_STS_REGION])[0]
        try:
            who = probe.caller_identity(region)
        except AwsFailure as failure:
            sts = Check(
                "sts",
                FAIL,
                f"{failure.reason}: {failure.message}",
                f"See docs/troubleshooting.md#{failure.reason.lower()}.",
            )
        except Exception as exc:  # noqa: BLE001 - a report line, never a traceback
            sts = unexpected("sts", exc)
        else:
            source = probe.credential_source or "unknown"
            sts = Check(
                "sts", PASS, f"GetCallerIdentity in {region}: {stable_identity(who)} (credentials from {source})"
            )
        if sts.result == FAIL:
            blocked = "sts"

    checks = [identity, token, role, regions_check(declared), sts]
    if rotation_queue:
        checks.append(queue_check(probe, rotation_queue, blocked))
    checks.append(kube)
    if declared is None:
        checks.append(Check("credentials", SKIP, "kubernetes failed: the ConnectorCredentials are not known"))
        return checks
    if not declared and not missing:
        checks.append(Check("credentials", SKIP, "no ConnectorCredential is declared here"))
    for item in declared:
        verdict = credential_verdict(item, roles)
        if isinstance(verdict, ConnectorCredentialSpec):
            if blocked is not None:
                checks.append(Check("credential", SKIP, f"{blocked} failed: not read", credential=item.ref))
                continue
            try:
                verdict = read_verdict(verdict, probe, default_interval, redaction or NeedleIndex())
            except Exception as exc:  # noqa: BLE001 - a report line, never a traceback
                checks.append(unexpected("credential", exc, credential=item.ref))
                continue
        checks.append(credential_line(item, verdict))
    for name in missing:
        where = f"namespace {', '.join(namespaces)}" if namespaces else "any namespace"
        fix = "Check the name (kubectl get ccred), or pass -n for its namespace."
        checks.append(Check("credential", FAIL, f"not declared in {where}", fix, credential=name))
    return checks


def queue_check(probe: Probe, url: str, blocked: str | None) -> Check:
    """CCRED_ROTATION_QUEUE_URL can be read with the operator's identity (GetQueueAttributes)."""
    from connector_credentials.adapters.aws.rotation_queue import queue_problem

    if blocked is not None:
        return Check("rotation-queue", SKIP, f"{blocked} failed: no AWS call can succeed")
    try:
        waiting = probe.rotation_queue(url)
    except Exception as exc:  # noqa: BLE001 - a report line, never a traceback
        kind, message = queue_problem(exc, url, probe.environ.get("AWS_ROLE_ARN"))
        return Check(
            "rotation-queue",
            FAIL,
            f"{kind}: {message}",
            "See docs/troubleshooting.md#the-rotation-queue; meanwhile rotations are read at each refreshInterval.",
        )
    return Check("rotation-queue", PASS, f"GetQueueAttributes on {url}: {waiting} message(s) waiting")


def unexpected(check: str, exc: BaseException, *, credential: str | None = None) -> Check:
    """A failure the product has no words for: its type only (its text could quote anything)."""
    return Check(
        check,
        FAIL,
        f"failed unexpectedly ({type(exc).__name__})",
        "Run the operator with --verbose and see its log, or report it with this line.",
        credential=credential,
    )


# --- output -----------------------------------------------------------------------------------------


def failed(checks: Sequence[Check]) -> bool:
    return any(check.result == FAIL for check in checks)


def as_document(checks: Sequence[Check], namespaces: list[str] | None) -> dict[str, Any]:
    """What ``-o json`` prints (docs/reference.md#doctor)."""
    return {
        "result": "fail" if failed(checks) else "pass",
        "namespaces": namespaces,
        "checks": [check.as_json() for check in checks],
    }


def as_text(checks: Sequence[Check]) -> str:
    lines = []
    for check in checks:
        label = f"credential {check.credential}" if check.credential else check.check
        detail = f"{check.reason}: {check.detail}" if check.reason else check.detail
        # On FAIL, what to fix follows on the same line (one line per check, for grep and for scripts).
        fix = f"{'' if detail.endswith('.') else '.'} Fix: {check.fix}" if check.fix else ""
        lines.append(f"{check.result}  {label:<11}  {detail}{fix}")
    counts = {result: sum(c.result == result for c in checks) for result in (FAIL, PASS, SKIP)}
    lines.append(
        f"{'FAIL' if failed(checks) else 'PASS'}: {counts[FAIL]} failed, {counts[PASS]} passed, {counts[SKIP]} skipped"
    )
    return "\n".join(lines)


# --- the I/O ----------------------------------------------------------------------------------------


class LiveProbe:
    """The product's own clients: :class:`~connector_credentials.adapters.aws.secrets.Boto3SecretsPort` (boto3's chain,
    ``AWS_ENDPOINT_URL`` and all) and
    :class:`~connector_credentials.adapters.kube.apiserver.KubeStatusSink` (in-cluster or ``KUBECONFIG``)."""

    def __init__(self, settings: OperatorSettings, environ: Mapping[str, str]) -> None:
        from connector_credentials.adapters.aws.secrets import Boto3SecretsPort

        self.environ = dict(environ)
        self._port = Boto3SecretsPort(settings, dict(environ))

    @property
    def credential_source(self) -> str | None:
        return self._port.credential_source

    def read_token(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read(MAX_TOKEN_BYTES)

    def list_credentials(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        return asyncio.run(_list(namespaces))

    def caller_identity(self, region: str) -> str:
        return self._port.caller_identity(region)

    def read(self, spec: ConnectorCredentialSpec) -> tuple[str, FetchedSecret]:
        # As the reader's single read does: who we are (as the role, if one is named), then the secret.
        identity = self._port.caller_identity(spec.arn.region, role=spec.role)
        fetched = self._port.get_secret(
            spec.arn, version_id=spec.version_id, version_stage=spec.effective_stage, role=spec.role
        )
        return identity, fetched

    def rotation_queue(self, url: str) -> int:
        from connector_credentials.adapters.aws.rotation_queue import queue_region

        client = self._port.queue_client(queue_region(url, self.environ), 0)
        answer = client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        return int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))


async def _list(namespaces: list[str] | None) -> list[dict[str, Any]]:
    from connector_credentials.adapters.kube.apiserver import KubeStatusSink

    sink = KubeStatusSink()
    try:
        return await sink.list_credentials(namespaces)
    finally:
        await sink.close()


def run(settings: OperatorSettings, names: Sequence[str], *, output: str) -> int:
    """Run every check against this environment, print the report; the exit code (0 pass, 1 fail)."""
    import click

    from connector_credentials.cli import logs

    redacting = logs.configure_for_command()
    namespaces = settings.watched_namespaces()
    checks = diagnose(
        LiveProbe(settings, os.environ),
        namespaces=namespaces,
        names=names,
        allow_other=settings.allow_non_irsa_credentials,
        roles=RoleAllowlist(settings.assumable_roles),
        default_interval=settings.default_refresh_interval,
        redaction=redacting.index,
        rotation_queue=settings.rotation_queue_url,
    )
    if output == "json":
        click.echo(json.dumps(as_document(checks, namespaces), indent=2))
    else:
        click.echo(as_text(checks))
    return 1 if failed(checks) else 0
