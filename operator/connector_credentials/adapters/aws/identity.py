"""Which workload identity the pod has (IRSA or EKS Pod Identity), what is wrong with it, and the
words a status uses for each.

Pure apart from reading the token files: no boto3 calls.
:class:`~connector_credentials.adapters.aws.secrets.Boto3SecretsPort` asks these questions before it lets
boto3 resolve its credential chain, so that a pod without a workload identity never falls back to
the node's instance role.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse

import botocore.exceptions

from connector_credentials.api.conditions import Reason
from connector_credentials.core.failures import IRSA_CHECKS, AwsFailure, scrub

IRSA_METHOD = "assume-role-with-web-identity"
POD_IDENTITY_METHOD = "container-role"
ROLE_ENV = "AWS_ROLE_ARN"
TOKEN_ENV = "AWS_WEB_IDENTITY_TOKEN_FILE"
FULL_URI_ENV = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
AUTH_TOKEN_FILE_ENV = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
POD_IDENTITY_AGENT = "169.254.170.23"
#: How much of a Pod Identity token file is read to check it (a projected token is about 1 KiB).
MAX_HEADER_TOKEN = 65536

#: status.credentialSource for the two workload identities (any other source: boto3's method name).
IRSA = "IRSA"
POD_IDENTITY = "PodIdentity"

ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
_SUBJECT = re.compile(r"^system:serviceaccount:([^:]+):([^:]+)$")

Environ = dict[str, str] | os._Environ[str]


def configured(environ: Environ) -> str | None:
    """The workload identity the environment sets up (``IRSA``, ``PodIdentity``), or ``None``.

    As boto3's chain does: complete IRSA variables come first, then the Pod Identity agent's URI;
    half an IRSA setup without Pod Identity is IRSA (with a problem to report).
    """
    if environ.get(ROLE_ENV) and environ.get(TOKEN_ENV):
        return IRSA
    if environ.get(FULL_URI_ENV):
        return POD_IDENTITY
    if environ.get(ROLE_ENV) or environ.get(TOKEN_ENV):
        return IRSA
    return None


def source_name(method: str) -> str:
    """status.credentialSource for a boto3 credential method."""
    return {IRSA_METHOD: IRSA, POD_IDENTITY_METHOD: POD_IDENTITY}.get(method, method)


def irsa_problem(environ: Environ) -> str | None:
    """Why the pod has no usable web-identity setup, or ``None`` when it has one."""
    missing = [name for name in (ROLE_ENV, TOKEN_ENV) if not environ.get(name)]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set in the operator's container"
    role = environ[ROLE_ENV]
    if not ROLE_ARN.match(role):
        return (
            f"AWS_ROLE_ARN={role!r} is not an IAM role ARN (arn:aws:iam::<account-id>:role/<name>); "
            "the service account annotation eks.amazonaws.com/role-arn must hold the full role ARN"
        )
    return _token_problem(environ[TOKEN_ENV], "web-identity")


def pod_identity_problem(environ: Environ) -> str | None:
    """Why the Pod Identity token cannot be sent to the agent, or ``None`` when it can."""
    token_file = environ.get(AUTH_TOKEN_FILE_ENV)
    if not token_file:
        return f"{FULL_URI_ENV} is set but {AUTH_TOKEN_FILE_ENV} is not"
    return _token_problem(token_file, "Pod Identity", header=True)


def _token_problem(token_file: str, kind: str, *, header: bool = False) -> str | None:
    """Why the token cannot be sent. ``header``: it goes as-is into an HTTP header (Pod Identity)."""
    try:
        with open(token_file, "rb") as handle:
            head = handle.read(MAX_HEADER_TOKEN if header else 1)
    except OSError as exc:
        return f"the {kind} token file {token_file} cannot be read ({exc.strerror or type(exc).__name__})"
    if not head:
        return f"the {kind} token file {token_file} is empty"
    if header and (b"\n" in head or b"\r" in head):
        # The SDK refuses to send it (not a legal header value); a projected token never has one.
        return (
            f"the {kind} token file {token_file} contains a line break; it must hold the projected token only "
            "(mount the eks-pod-identity-token volume as EKS injects it)"
        )
    return None


def token_problem_of(exc: ValueError, environ: Environ) -> AwsFailure | None:
    """The SDK's refusal to send a Pod Identity token as a header, in a status's words (else ``None``)."""
    if "header" not in str(exc) or not environ.get(FULL_URI_ENV):
        return None
    token_file = environ.get(AUTH_TOKEN_FILE_ENV, "")
    return pod_identity_failure(f"the token in {token_file} cannot be sent (it contains a line break)", environ)


def service_account(environ: Environ) -> tuple[str, str] | None:
    """(namespace, service account) from the projected token's ``sub`` claim, unverified.

    Only the claim is decoded, to name the association to check; the token is never logged.
    """
    token_file = environ.get(AUTH_TOKEN_FILE_ENV) or environ.get(TOKEN_ENV)
    if not token_file:
        return None
    try:
        with open(token_file, "rb") as handle:
            token = handle.read(16384)
        payload = token.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return None
    match = _SUBJECT.match(str(claims.get("sub", ""))) if isinstance(claims, dict) else None
    return (match.group(1), match.group(2)) if match else None


def pod_identity_checks(environ: Environ) -> str:
    """What to check when Pod Identity fails, naming this pod's namespace and service account."""
    subject = service_account(environ)
    namespace, account = subject if subject else ("<namespace>", "<service-account>")
    # The agent's address as EKS injected it: 169.254.170.23, or [fd00:ec2::23] on IPv6 clusters.
    agent = urllib.parse.urlsplit(environ.get(FULL_URI_ENV, "")).hostname or POD_IDENTITY_AGENT
    return (
        f"Check that an EKS Pod Identity association exists for namespace {namespace} and service account "
        f"{account} (aws eks list-pod-identity-associations --cluster-name <cluster> --namespace {namespace} "
        f"--service-account {account}) and that the pod was restarted after it was created; that the "
        f"eks-pod-identity-agent add-on is installed and its pod runs on this node (kubectl -n kube-system get "
        f"pods -l app.kubernetes.io/name=eks-pod-identity-agent); and, if the pod uses an HTTP proxy, that "
        f"NO_PROXY includes {agent}."
    )


def pod_identity_failure(problem: str, environ: Environ, *, transient: bool = False) -> AwsFailure:
    return AwsFailure(
        Reason.POD_IDENTITY_FAILED,
        f"EKS Pod Identity credentials could not be obtained: {problem}. {pod_identity_checks(environ)}",
        transient=transient,
    )


def from_retrieval_error(exc: botocore.exceptions.CredentialRetrievalError, environ: Environ) -> AwsFailure | None:
    """A Pod Identity agent failure in the words of a status (``None``: not the agent's)."""
    if exc.kwargs.get("provider") != POD_IDENTITY_METHOD:
        return None
    said = scrub(str(exc.kwargs.get("error_msg", "")))
    uri = environ.get(FULL_URI_ENV, "")
    if "non 200 response" in said:
        return pod_identity_failure(f"the agent at {uri} answered with an error ({said})", environ)
    # Connection refused, timeouts: the agent is restarting, or not on this node; retried with backoff.
    return pod_identity_failure(f"the agent at {uri} could not be reached ({said})", environ, transient=True)


def neither_configured() -> AwsFailure:
    return AwsFailure(
        Reason.IRSA_NOT_CONFIGURED,
        "No workload identity: AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE are not set (IRSA), nor are "
        f"{FULL_URI_ENV} and {AUTH_TOKEN_FILE_ENV} (EKS Pod Identity), in the operator's container. Fix it one of "
        "two ways. "
        f"IRSA: {IRSA_CHECKS} Or EKS Pod Identity: create a Pod Identity association for the operator's namespace "
        "and service account (aws eks create-pod-identity-association), install the eks-pod-identity-agent "
        "add-on, and restart the pod. Other credential sources (node instance role, static keys) are refused "
        "unless CCRED_ALLOW_NON_IRSA_CREDENTIALS=true.",
    )
