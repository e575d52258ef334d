"""What the engine knows about one credential, in four parts, and what it answers.

An :class:`Entry` groups the API's view (:class:`ApiView`), the value held (:class:`Held`,
masked in ``repr``), the schedule (:class:`Schedule`) and the status writer's state
(:class:`~connector_credentials.core.status.Reporting`). :class:`Served` is an answer to the socket.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

from connector_credentials.api.models import ConnectorCredentialSpec, InvalidSpecError, parse_spec
from connector_credentials.api.values import SecretValue
from connector_credentials.api.wire import RenderedBody, render_credential
from connector_credentials.core.ports import FetchedSecret
from connector_credentials.core.reads import ReadKey
from connector_credentials.core.status import Reporting, older_version

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict of one check."""

    ready: bool
    reason: str
    message: str
    transient: bool = False


@dataclass(slots=True)
class ApiView:
    """What the API says about the credential."""

    uid: str | None = None
    generation: int | None = None
    raw_spec: Any = None
    spec: ConnectorCredentialSpec | None = None
    spec_error: str | None = None
    #: refreshInterval in seconds, parsed once per spec (the hot path asks for it on every read).
    interval: float | None = None
    #: What the spec makes the operator read (None: nothing, the spec is invalid or its role refused).
    reads: ReadKey | None = None
    live_status: dict[str, Any] = field(default_factory=dict)
    resource_version: str | None = None

    def observe(self, meta: dict[str, Any], status: Any, *, created: bool) -> bool:
        """Take in a watched body's metadata and status; ``False`` (and nothing taken) when it is
        older than one already seen (a late listing, a queued event): it would roll the live status
        back, and make the next write move lastTransitionTime."""
        if not created and older_version(meta.get("resourceVersion"), self.resource_version):
            return False
        self.resource_version = meta.get("resourceVersion") or self.resource_version
        self.uid = meta.get("uid") or self.uid
        self.generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
        self.live_status = dict(status) if isinstance(status, dict) else {}
        return True

    def spec_differs(self, raw_spec: Any) -> bool:
        """Whether a watched body's spec is not the one taken (compared as canonical JSON)."""
        return _canonical(raw_spec) != _canonical(self.raw_spec)

    def take_spec(self, raw_spec: Any, default_interval: float) -> bool:
        """Parse a new spec (an invalid one leaves ``spec`` None and says why in ``spec_error``).
        ``True`` when it reads what the valid spec before it read: the value held stays valid."""
        before = self.spec
        self.raw_spec = raw_spec
        try:
            self.spec, self.spec_error = parse_spec(raw_spec), None
            self.interval = self.spec.refresh_seconds(default_interval)
        except InvalidSpecError as exc:
            self.spec, self.spec_error, self.interval = None, str(exc), None
        return before is not None and self.spec is not None and _reads(before) == _reads(self.spec)


def _reads(spec: ConnectorCredentialSpec) -> tuple[Any, ...]:
    """What a spec makes the operator read: a change here invalidates the value held."""
    return (spec.secret_arn, spec.version_id, spec.effective_stage, spec.json_key, spec.role)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(repr=False, slots=True)
class Held:
    """The value this replica resolved, and when. Its ``repr`` never shows the value."""

    value: SecretValue | None = None
    #: The 200 body, rendered once per fetch: the hot path serves these bytes as they are.
    body: RenderedBody | None = None
    version_id: str | None = None
    fetched_at: datetime.datetime | None = None
    fetched_mono: float | None = None
    verified_mono: float | None = None
    identity: str | None = None
    #: status.credentialSource: how the operator's own credentials were obtained (IRSA, PodIdentity, ...).
    credential_source: str | None = None

    def keep(self, value: SecretValue, fetched: FetchedSecret, secret_arn: str, now_mono: float) -> None:
        """A value just read and verified, and the 200 body it is served with."""
        now = datetime.datetime.now(datetime.UTC)
        self.value, self.version_id, self.fetched_at = value, fetched.version_id, now
        self.body = render_credential(value, fetched.version_id, secret_arn, now)
        self.fetched_mono = self.verified_mono = now_mono

    def drop(self) -> None:
        """The value goes, and with it its verification: nothing verified is held any more."""
        self.value = self.body = None
        self.version_id = self.fetched_at = self.fetched_mono = self.verified_mono = None

    def __repr__(self) -> str:
        held = "<masked>" if self.value is not None else None
        return f"Held(value={held}, version_id={self.version_id!r}, fetched_at={self.fetched_at!r})"


@dataclass(slots=True)
class Schedule:
    """How the last checks went and when the next is due (the reader holds the plan itself)."""

    outcome: Outcome | None = None
    failures: int = 0
    due: float = 0.0
    #: The number of the newest read applied: an older answer that arrives late is not applied.
    applied: int = 0


@dataclass(repr=False, slots=True)
class Entry:
    """One declared credential: the API's view, the value held, the schedule, the writer's state."""

    namespace: str
    name: str
    api: ApiView = field(default_factory=ApiView)
    held: Held = field(default_factory=Held)
    schedule: Schedule = field(default_factory=Schedule)
    reporting: Reporting = field(default_factory=Reporting)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    def __repr__(self) -> str:
        outcome = self.schedule.outcome
        return f"Entry({self.namespace}/{self.name}, reason={outcome.reason if outcome else None}, held={self.held!r})"


@dataclass(frozen=True, slots=True)
class Served:
    """The engine's answer to a socket request (its value and body are masked in ``repr``)."""

    status: int
    value: SecretValue | None = None
    version_id: str | None = None
    arn: str | None = None
    fetched_at: datetime.datetime | None = None
    reason: str | None = None
    message: str | None = None
    retry_after: int | None = None
    #: The rendered 200 body, when the engine has it already.
    body: RenderedBody | None = None
