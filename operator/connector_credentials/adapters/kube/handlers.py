"""Thin kopf handlers: the watch feeds the engine; kopf stores nothing on our objects."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from typing import Any, cast

import kopf
from kopf._cogs.structs import bodies, ephemera  # the types of ResourceMemories.recall
from kopf._core.reactor import inventory  # public in kopf.operator(memories=...), not re-exported

from connector_credentials.adapters.kube import apiserver
from connector_credentials.api.models import ANNOTATION_PREFIX, GROUP, PLURAL, VERSION
from connector_credentials.core.engine import Engine
from connector_credentials.core.relists import Relists


def register(registry: kopf.OperatorRegistry, engine: Engine, noticed: Relists) -> None:
    """Add this operator's handlers to ``registry``; ``noticed`` is told what the watch delivers
    (docs/design.md, "A re-list forgets what it lacks")."""

    @kopf.on.cleanup(registry=registry, id="drain")
    async def drain(**_: Any) -> None:
        # kopf is stopping (SIGTERM): stop checking, keep serving what is held. The command line
        # closes the socket after CCRED_SHUTDOWN_DRAIN and only then drops the values.
        await engine.drain()

    @kopf.on.startup(registry=registry, id="settings")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Every sidecar must watch and serve its own controller: never pause for a peer.
        settings.peering.standalone = True
        # Our own prefix for anything kopf might store; event handlers store nothing.
        settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
        # No change detection: event handlers need none, and kopf's own deep-copies every body.
        settings.persistence.diffbase_storage = NoDiffBase()
        # No resource scanning: watching CRDs and Namespaces would need cluster-wide rights the
        # operator has no use for. The namespaces are the ones given; the resource is found once,
        # at start (the CLI starts kopf only once the CRD is served).
        settings.scanning.disabled = True
        # Events are ours (one per transition); kopf must not turn log lines into events.
        settings.posting.enabled = False
        # kopf keeps a worker (its task, queue and the last event's body) per object until it has
        # been idle this long: with 5 s (kopf's default), a first pass over N objects holds N of them.
        # The handler only hands the body to the engine, so a worker is cheap to start again.
        settings.queueing.idle_timeout = 0.1
        # kopf lists the objects before it watches, all in one response by default: 10,000 bodies
        # (managedFields and all) held at once. In pages, each is handed to the workers and dropped.
        settings.watching.chunk_size = 250
        # Watch streams that go silent are re-established instead of freezing.
        # An integer: kopf sends it as ?timeoutSeconds=, and the API server answers "300.0" with 400.
        settings.watching.server_timeout = max(1, round(engine.settings.watch_server_timeout))
        settings.watching.client_timeout = engine.settings.watch_client_timeout
        settings.watching.connect_timeout = 10
        settings.watching.reconnect_backoff = 1.0
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 10
        # kopf retries a failed API request (5xx, connection refused) for 54 s in all, then gives up
        # and the operator exits: the socket would vanish while every value is still held. Retry for
        # as long as the API is away (an upgrade, an etcd failover), every 30 s at most.
        settings.networking.error_backoffs = RetryForever()

    @kopf.on.login(registry=registry, id="login")
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
        return apiserver.login(settings)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="watch")
    async def on_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        # Before the engine hears of it: whether it knew the object tells a re-list from a first sight.
        noticed.saw(type, key, known=engine.get_entry(*key) is not None, synced=engine.synced.is_set())
        if type == "DELETED":
            engine.remove(*key)
        else:
            # In a context of its own: a task the engine starts copies the context it is started in,
            # and kopf's holds this event (its cause, body and logger) for as long as the task runs.
            contextvars.Context().run(engine.upsert, _plain(body))


class NoDiffBase(kopf.DiffBaseStorage):
    """An essence that never changes, stored nowhere.

    kopf computes an object's "essence" (a deep copy of the body, managedFields and all) on every
    watch event, for on.create/update/resume handlers to compare with the last one handled. This
    operator registers only an event handler, which ignores it: at a first pass over 10,000
    objects that copy was about a tenth of the operator's CPU. Nothing is written to objects.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return cast(kopf.BodyEssence, {})

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class NoMemories(inventory.ResourceMemories):
    """kopf's memory of each object, never kept.

    kopf remembers every object it has seen (about 640 bytes each, until the object is deleted)
    for what this operator does not use: change handlers (was it seen by the listing, handled
    once), daemons, indexes, admission webhooks, a per-object memo, and the throttling of an
    object whose processing failed. An event handler needs none of it between two events, so
    each event gets a fresh memory, which is dropped after it.
    """

    async def recall(
        self,
        raw_body: bodies.RawBody,
        *,
        memobase: ephemera.AnyMemo | None = None,
        noticed_by_listing: bool = False,
        ephemeral: bool = False,
    ) -> inventory.ResourceMemory:
        return await super().recall(raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing, ephemeral=True)


class RetryForever:
    """kopf's own delays between API retries (1 s up to 21 s), then every 30 s, without end. kopf
    iterates it afresh for each request (it must not be a one-shot iterator)."""

    FIRST = (1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0)
    THEN = 30.0

    def __iter__(self) -> Iterator[float]:
        yield from self.FIRST
        while True:
            yield self.THEN


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {
        "metadata": dict(body.get("metadata", {})),
        "spec": _thaw(body.get("spec")),
        "status": _thaw(body.get("status")),
    }


def _thaw(value: Any) -> Any:
    # The engine keeps each object's spec and status: one copy of each key, and of each text
    # that many objects share (reasons, times, the identity), for all of them.
    return apiserver.interned(value)
