"""Reusable fakes of the core's ports, for tests of the core and the adapters without I/O.

Each fake documents its limits: what it does not do that the real adapter does. When a test
needs that, it belongs in tests/integration, against the real API server and moto.

* :class:`FakePort`: a ``SecretsPort`` with one scripted answer.
* :class:`ScriptedPort`: a ``SecretsPort`` that records calls, scripts failures per ARN, and
  can refuse or hold batches (for the reader's batching and priority lane).
* :class:`FakeSink`: a ``StatusSink`` holding objects like an API server.
* :class:`StubEngine`: the entries the metrics collector reads.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from connector_credentials.api.models import SecretArn
from connector_credentials.core.engine import Engine
from connector_credentials.core.entry import Entry
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import BatchRefused, FetchedSecret
from connector_credentials.core.status import StatusConflict

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf"
IDENTITY = "arn:aws:sts::123456789012:assumed-role/xpander-controller/botocore-session-1"
#: The value FakePort serves: a canary that tests look for where it must not appear.
VALUE = "CANARY-engine-91ab"


class FakePort:
    """A :class:`SecretsPort` that answers every read with ``answer`` (a value, or a failure to raise).

    Limits: one answer for every secret and version (set ``answer`` between reads to script a
    sequence); no roles (``role`` is ignored), no throttling, no threads of its own; the batch
    answers each secret as a single read would. ``calls`` counts reads, batched or not.
    """

    credential_source = "IRSA"

    def __init__(self) -> None:
        self.answer: FetchedSecret | AwsFailure = FetchedSecret("v1", VALUE, ("AWSCURRENT",))
        self.calls = 0

    def caller_identity(self, region: str, *, role: Any = None) -> str:
        return IDENTITY

    def get_secret(
        self, arn: SecretArn, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        self.calls += 1
        if isinstance(self.answer, AwsFailure):
            raise self.answer
        return self.answer

    def get_current_secrets(self, region: str, arns: Any, *, role: Any = None) -> dict[str, FetchedSecret | AwsFailure]:
        """A batch: each secret as get_secret answers it (so subclasses script both paths)."""
        found: dict[str, FetchedSecret | AwsFailure] = {}
        for arn in arns:
            try:
                found[arn.arn] = self.get_secret(arn, version_id=None, version_stage="AWSCURRENT")
            except AwsFailure as failure:
                found[arn.arn] = failure
        return found


class FakeSink:
    """A :class:`StatusSink` that holds objects like an API server: merge-patches status (with
    resourceVersion conflicts), records events, and can fail (``fail_next``) or hold writes (``gate``).

    Limits: status is merged one level deep only (as the operator writes it); no watch, no listing
    (``credential_pages``/``crd_served`` are absent: use the real API server of tests/integration);
    events are kept as (warning, reason, message) without deduplication.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[bool, str, str]] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((namespace, name))
        return None if obj is None else json.loads(json.dumps(obj))

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("api down")
        if self.gate is not None:
            await self.gate.wait()
        current = self.objects.get((namespace, name))
        if (
            resource_version is not None
            and current is not None
            and current["metadata"]["resourceVersion"] != resource_version
        ):
            raise StatusConflict(resource_version)
        self.patches.append(status)
        obj = self.objects.setdefault((namespace, name), {"status": {}, "metadata": {"resourceVersion": "1"}})
        obj["status"].update(status)
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        copy: dict[str, Any] = json.loads(json.dumps(obj))  # what the API server would send back
        return copy

    async def post_event(
        self, namespace: str, name: str, uid: str | None, *, warning: bool, reason: str, message: str
    ) -> None:
        self.events.append((warning, reason, message))


class ScriptedPort:
    """A :class:`SecretsPort` that answers every secret with its own name as the value, records each
    call (``singles``, ``batches``, ``batch_roles``), and counts how many run at once (``most_running``).

    Limits: ``failing`` scripts a failure per ARN, ``silent`` leaves ARNs out of batch answers,
    ``refuse_batches`` raises :class:`BatchRefused` (for every role, or for the roles in
    ``refused_roles``), ``gate`` holds batches (up to 10 s) until set (only those ``holds`` picks by
    their secret names), ``latency`` adds seconds to every call; the current version is "v1"
    unless ``versions`` names another for the ARN (a version asked for is answered as it is);
    roles are recorded, not checked.
    """

    credential_source = "IRSA"
    identity = "arn:aws:sts::123456789012:assumed-role/xpander-controller/s"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.singles: list[tuple[str, str | None, str | None]] = []
        self.batches: list[list[str]] = []
        self.batch_roles: list[Any] = []
        self.failing: dict[str, AwsFailure] = {}
        self.versions: dict[str, str] = {}
        self.silent: set[str] = set()
        self.refuse_batches = False
        self.refused_roles: set[Any] = set()
        self.latency = 0.0
        self.holds: Callable[[list[str]], bool] = lambda names: True
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.most_running = 0

    def _enter(self) -> None:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        if self.latency:
            time.sleep(self.latency)

    def _leave(self) -> None:
        with self.lock:
            self.running -= 1

    def caller_identity(self, region: str, *, role: Any = None) -> str:
        return self.identity

    def get_secret(
        self, arn: SecretArn, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        self._enter()
        try:
            with self.lock:
                self.singles.append((arn.name, version_id, version_stage))
            if arn.arn in self.failing:
                raise self.failing[arn.arn]
            return FetchedSecret(version_id or self.versions.get(arn.arn, "v1"), arn.name, ("AWSCURRENT",))
        finally:
            self._leave()

    def get_current_secrets(self, region: str, arns: Any, *, role: Any = None) -> dict[str, FetchedSecret | AwsFailure]:
        self._enter()
        try:
            names = [a.name for a in arns]
            if self.holds(names):
                self.gate.wait(10)
            with self.lock:
                self.batches.append(names)
                self.batch_roles.append(role)
            if self.refuse_batches or role in self.refused_roles:
                raise BatchRefused("not authorized to perform: secretsmanager:BatchGetSecretValue")
            found: dict[str, FetchedSecret | AwsFailure] = {}
            for a in arns:
                if a.arn in self.silent:
                    continue
                found[a.arn] = self.failing.get(a.arn) or FetchedSecret(
                    self.versions.get(a.arn, "v1"), a.name, ("AWSCURRENT",)
                )
            return found
        finally:
            self._leave()


class StubEngine:
    """The part of an :class:`Engine` the metrics collector reads: its entries.

    Limits: nothing else (no ``serve``, no ``metrics``): a socket test needs a stand-in of its own.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = entries

    def entries(self) -> list[Entry]:
        return list(self._entries)


def body(spec: dict[str, Any], status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    """A ConnectorCredential as kopf hands it over: team-a/slack with this spec."""
    return {
        "metadata": {"namespace": "team-a", "name": "slack", "uid": "u1", "generation": generation},
        "spec": spec,
        "status": status or {},
    }


async def settle(engine: Engine) -> None:
    """Wait (up to 1 s) until no read of the engine is running or due within 0.2 s (a first check
    leaves after a short batch window) and no status write is in flight."""
    for _ in range(100):
        await asyncio.sleep(0.01)
        entries = engine.entries()
        if not engine.reads.busy(within=0.2) and all(not e.reporting.writing for e in entries):
            return
