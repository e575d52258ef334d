"""The kopf handlers' memory: nothing of kopf's event reaches the engine's tasks, kopf keeps no
memory per object, and the status and spec the engine keeps share their keys and texts."""

from __future__ import annotations

import contextvars
import sys
import threading
from typing import Any

import kopf

from connector_credentials.adapters.kube import handlers
from connector_credentials.core.relists import Relists

CAUSE: contextvars.ContextVar[object] = contextvars.ContextVar("cause")  # as kopf's cause_var holds the event


class RecordingEngine:
    def __init__(self) -> None:
        self.upserts: list[tuple[dict[str, Any], list[str]]] = []
        self.synced = threading.Event()  # what the handler asks of it: is_set()

    def get_entry(self, namespace: str, name: str) -> None:
        return None

    def upsert(self, body: dict[str, Any]) -> None:
        # A task the engine starts here would copy this context.
        self.upserts.append((body, [var.name for var in contextvars.copy_context()]))

    def remove(self, namespace: str, name: str) -> None:
        pass


def watch_handler(engine: RecordingEngine) -> Any:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, engine, Relists())  # type: ignore[arg-type]
    (handler,) = [h for h in registry._watching.get_all_handlers() if h.id == "watch"]
    return handler.fn


def body(name: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": name, "uid": f"uid-{name}", "resourceVersion": "7"},
        "spec": {"secretArn": "arn:aws:secretsmanager:us-east-1:111122223333:secret:a-AbCdEf", "refreshInterval": "5m"},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "AccessVerified"}]},
    }


async def test_the_engine_is_told_of_an_object_outside_kopfs_context() -> None:
    engine = RecordingEngine()
    on_event = watch_handler(engine)
    token = CAUSE.set(object())  # kopf sets its cause (body, patch, logger) around the handler
    try:
        await on_event(type="ADDED", body=kopf.Body(body("slack")))
    finally:
        CAUSE.reset(token)
    ((seen, context),) = engine.upserts
    assert seen["metadata"]["name"] == "slack"
    assert context == []


async def test_two_objects_share_their_keys_and_repeated_texts() -> None:
    engine = RecordingEngine()
    on_event = watch_handler(engine)
    for name in ("one", "two"):
        await on_event(type="MODIFIED", body=kopf.Body(body(name)))
    (first, _), (second, _) = engine.upserts
    one, two = first["status"]["conditions"][0], second["status"]["conditions"][0]
    assert one == two and one is not two
    for key in one:
        assert next(k for k in two if k == key) is key is sys.intern(key)
    assert one["reason"] is two["reason"]
    assert first["spec"]["refreshInterval"] is second["spec"]["refreshInterval"]


async def test_kopf_keeps_no_memory_of_an_object() -> None:
    memories = handlers.NoMemories()
    raw = {"metadata": {"uid": "uid-1", "name": "one", "namespace": "team-a"}}
    first = await memories.recall(raw)  # type: ignore[arg-type]
    second = await memories.recall(raw, noticed_by_listing=True)  # type: ignore[arg-type]
    assert first is not second and second.noticed_by_listing
    assert list(memories.iter_all_memories()) == []
