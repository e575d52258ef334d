"""Cross-account roles: the ``sts:AssumeRole`` sessions the operator keeps for them,
one per (role, external id), renewed shortly before they expire. Which roles may be named at all
is :mod:`connector_credentials.core.allowlist`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.exceptions
import botocore.session

from connector_credentials.adapters.aws.errors import classify
from connector_credentials.api.conditions import Reason
from connector_credentials.api.models import AssumedRole, SecretArn
from connector_credentials.core.failures import AwsFailure, scrub

#: A session is renewed when less than this is left of it (seconds).
RENEW_BEFORE = 300.0
#: How long each assumed session is asked for (the default and minimum of AssumeRole are 1 h / 15 min).
SESSION_SECONDS = 3600
SESSION_NAME = "connector-credential-operator"

#: Answers that are not about the chained role's trust: classified as for any call (throttling, outages,
#: an expired session of the operator's own identity, clock skew), mostly transient.
_NOT_A_REFUSAL = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalFailure",
        "ServiceUnavailable",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
    }
)


#: The AWS services the operator calls.
SERVICES = ("secretsmanager", "sts", "sqs")


def new_session(**credentials: str) -> boto3.Session:
    """A boto3 session (with these credentials, else the default chain's) whose endpoint data names
    only :data:`SERVICES`, and shared with every other session: botocore's ``endpoints.json`` names
    every service in every partition, about 6.7 MiB once parsed, and each session parsed its own."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _data_loader())
    return boto3.Session(botocore_session=core, **credentials)


@functools.cache
def _data_loader() -> Any:
    """botocore's data loader, its endpoint data pruned in place to :data:`SERVICES`: the endpoint
    resolver of every session is built from that same dict (``load_data`` caches it)."""
    loader = botocore.session.get_session().get_component("data_loader")
    endpoints = loader.load_data("endpoints")
    for partition in endpoints.get("partitions", ()):
        services = partition.get("services")
        if isinstance(services, dict):
            partition["services"] = {name: services[name] for name in SERVICES if name in services}
    return loader


@dataclass
class _Session:
    identity: str
    expires: float
    session: boto3.Session
    clients: dict[tuple[str, str], Any] = field(default_factory=dict)


class RoleSessions:
    """Sessions of assumed roles, shared by every read of that role, renewed before expiry."""

    def __init__(
        self,
        sts_client: Callable[[str], Any],
        config: Any,
        clock: Callable[[], float] = time.time,
        instrument: Callable[[Any], None] | None = None,
        own_failure: Callable[[BaseException, str], AwsFailure] | None = None,
    ) -> None:
        self._sts_client = sts_client
        self._config = config
        #: How a failure of the operator's own credentials reads (exception, region): the SDK fetches
        #: them lazily, inside the AssumeRole call, so their failures surface here too.
        self._own_failure = own_failure or _own_failure
        #: Called with every new client of a role's session (the metrics count its calls too).
        self._instrument = instrument
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[AssumedRole, _Session] = {}
        self._role_locks: dict[AssumedRole, threading.Lock] = {}
        #: AssumeRole calls made (for tests and logs).
        self.assumed = 0

    def identity(self, role: AssumedRole, region: str, *, base_identity: str | None) -> str:
        """The assumed-role ARN STS gave this role's session (assuming it if need be)."""
        return self._current(role, region, base_identity=base_identity).identity

    def client(self, role: AssumedRole, service: str, region: str, *, base_identity: str | None = None) -> Any:
        current = self._current(role, region, base_identity=base_identity)
        key = (service, region)
        with self._lock:
            client = current.clients.get(key)
            if client is None:
                client = current.session.client(service, region_name=region, config=self._config)  # type: ignore[call-overload]
                if self._instrument is not None:
                    self._instrument(client)
                current.clients[key] = client
            return client

    def _current(self, role: AssumedRole, region: str, *, base_identity: str | None) -> _Session:
        with self._lock:
            current = self._sessions.get(role)
            if current is not None and current.expires - self._clock() > RENEW_BEFORE:
                return current
            role_lock = self._role_locks.setdefault(role, threading.Lock())
        with role_lock:  # one AssumeRole per role at a time; reads of other roles go on
            with self._lock:
                current = self._sessions.get(role)
                if current is not None and current.expires - self._clock() > RENEW_BEFORE:
                    return current
            fresh = self._assume(role, region, base_identity=base_identity)
            with self._lock:
                self._sessions[role] = fresh
            return fresh

    def _assume(self, role: AssumedRole, region: str, *, base_identity: str | None) -> _Session:
        request: dict[str, Any] = {
            "RoleArn": role.arn,
            "RoleSessionName": SESSION_NAME,
            "DurationSeconds": SESSION_SECONDS,
        }
        if role.external_id:
            request["ExternalId"] = role.external_id
        self.assumed += 1
        try:
            answer = self._sts_client(region).assume_role(**request)
        except botocore.exceptions.CredentialRetrievalError as exc:  # the Pod Identity agent, say
            raise self._own_failure(exc, region) from None
        except botocore.exceptions.ClientError as exc:
            if exc.operation_name != "AssumeRole":
                # AssumeRoleWithWebIdentity (IRSA) refused while fetching the operator's own credentials:
                # the fix is on the operator's role, not on the chained one.
                raise self._own_failure(exc, region) from None
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _NOT_A_REFUSAL or status >= 500:
                raise classify(exc, arn=_placeholder(region), role=role.arn, version="") from None
            raise refused(role, code, scrub(str(error.get("Message", ""))), base_identity) from None
        except AwsFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            raise classify(exc, arn=_placeholder(region), role=role.arn, version="") from None
        credentials = answer["Credentials"]
        expiration = credentials["Expiration"]
        expires = expiration.timestamp() if hasattr(expiration, "timestamp") else self._clock() + SESSION_SECONDS
        session = new_session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
        )
        return _Session(identity=str(answer["AssumedRoleUser"]["Arn"]), expires=expires, session=session)


def _own_failure(exc: BaseException, region: str) -> AwsFailure:
    return classify(exc, arn=_placeholder(region), role=None, version="")


def refused(role: AssumedRole, code: str, said: str, base_identity: str | None) -> AwsFailure:
    """STS refused to let the operator's identity assume the chained role."""
    who = base_identity or "the operator's workload identity"
    external = (
        " and that its sts:ExternalId condition matches spec.externalId"
        if role.external_id
        else "; if it requires an sts:ExternalId, set spec.externalId"
    )
    return AwsFailure(
        Reason.ASSUME_ROLE_FAILED,
        f"STS refused sts:AssumeRole of role {role.arn} (spec.roleArn) for {who}. AWS said: {code}"
        f"{': ' + said if said else ''}. Check that the trust policy of {role.arn} names the operator's role as "
        f"principal{external}, and that the operator's role may sts:AssumeRole on {role.arn}.",
    )


def _placeholder(region: str) -> SecretArn:
    return SecretArn(arn="(sts:AssumeRole)", partition="aws", region=region, account="", name="")
