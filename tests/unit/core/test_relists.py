"""After a re-list of the watch: which entries a fresh listing lets the engine forget, and when a
re-list is noticed (pure logic: the engine with a scripted AWS port and an in-memory sink)."""

import asyncio
import logging
from typing import Any

import pytest

from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.engine import Engine
from connector_credentials.core.ports import FetchedSecret
from connector_credentials.core.relists import Relists
from tests.support.fakes import ARN, FakePort, FakeSink, settle


@pytest.fixture
async def engine() -> Any:
    port = FakePort()
    the_engine = Engine(OperatorSettings(socket_path="/nonexistent"), port, FakeSink())
    the_engine.synced.set()
    yield the_engine, port
    await the_engine.close()


def _body(namespace: str, name: str, version: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, "uid": f"uid-{name}", "generation": 1}
    if version is not None:
        meta["resourceVersion"] = version
    return {"metadata": meta, "spec": {"secretArn": ARN}, "status": {}}


async def _hold(engine: Engine, port: FakePort, namespace: str, name: str, version: str | None) -> str:
    """Declare a credential at ``version`` and let it be checked: the engine holds a value of its own."""
    value = f"CANARY-{namespace}-{name}"
    port.answer = FetchedSecret("v1", value, ("AWSCURRENT",))
    engine.upsert(_body(namespace, name, version))
    await settle(engine)
    assert (await engine.serve(namespace, name, refresh=False)).status == 200
    entry = engine.get_entry(namespace, name)
    assert entry is not None
    # The status write answered with the fake sink's own resourceVersion: the one seen last is this.
    entry.api.resource_version = version
    return value


async def test_what_a_fresh_listing_lacks_is_forgotten_unless_newer_than_it(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine, port = engine
    await _hold(engine, port, "team-a", "listed", "5")
    gone = await _hold(engine, port, "team-a", "gone", "7")
    await _hold(engine, port, "team-a", "at-the-snapshot", "10")
    await _hold(engine, port, "team-a", "created-after", "12")  # its ADDED came after the listing's snapshot
    await _hold(engine, port, "team-b", "elsewhere", "3")  # another namespace: another listing
    caplog.set_level(logging.INFO, logger="connector_credentials")

    forgotten = engine.forget_unlisted({("team-a", "listed")}, "10", ["team-a"])

    assert sorted(forgotten) == [("team-a", "at-the-snapshot"), ("team-a", "gone")]
    assert (await engine.serve("team-a", "gone", refresh=False)).status == 404
    assert engine.get_entry("team-a", "gone") is None
    assert gone not in engine.redaction.needles()  # dropped, not only unlisted
    for name in ("listed", "created-after"):
        assert (await engine.serve("team-a", name, refresh=False)).status == 200, name
    assert (await engine.serve("team-b", "elsewhere", refresh=False)).status == 200
    logged = [r.getMessage() for r in caplog.records if "Forgot" in r.getMessage()]
    assert logged == [
        f"Forgot team-a/{name}: it is not in a fresh listing of the API (deleted while the watch was down)."
        for name in ("gone", "at-the-snapshot")
    ]
    assert gone not in caplog.text


async def test_a_listing_of_all_namespaces_covers_every_entry(engine: Any) -> None:
    engine, port = engine
    await _hold(engine, port, "team-a", "one", "4")
    await _hold(engine, port, "team-b", "two", "6")
    assert sorted(engine.forget_unlisted(set(), "9", None)) == [("team-a", "one"), ("team-b", "two")]
    assert engine.entries() == []


async def test_versions_that_cannot_be_ordered_keep_the_entry(engine: Any) -> None:
    engine, port = engine
    await _hold(engine, port, "team-a", "opaque", "v-abc")
    await _hold(engine, port, "team-a", "unknown", None)
    await _hold(engine, port, "team-a", "numeric", "3")
    assert engine.forget_unlisted(set(), "9", ["team-a"]) == [("team-a", "numeric")]
    assert engine.forget_unlisted(set(), None, ["team-a"]) == []
    assert {e.name for e in engine.entries()} == {"opaque", "unknown"}


# --- noticing a re-list -----------------------------------------------------------------------


def test_the_first_listing_is_not_a_relist_and_a_repeated_one_is() -> None:
    relists = Relists()
    # kopf's first listing may land before or after the operator's own: no notice either way.
    relists.saw(None, ("ns", "a"), known=False, synced=False)
    relists.saw(None, ("ns", "b"), known=True, synced=True)
    relists.saw("MODIFIED", ("ns", "a"), known=True, synced=True)
    relists.saw("ADDED", ("ns", "c"), known=False, synced=True)
    assert not relists.noticed
    relists.saw(None, ("ns", "a"), known=True, synced=True)  # listed again
    assert relists.noticed


def test_a_relist_before_the_first_sync_is_noticed_too() -> None:
    relists = Relists()
    relists.saw(None, ("ns", "a"), known=False, synced=False)
    relists.saw(None, ("ns", "a"), known=True, synced=False)
    assert relists.noticed


def test_an_object_first_seen_in_a_listing_after_the_sync_is_a_relist() -> None:
    # Created while the watch was down, and alone in its re-list: nothing else would tell.
    relists = Relists()
    relists.saw(None, ("ns", "new"), known=False, synced=True)
    assert relists.noticed


def test_deleted_and_forgotten_objects_are_first_sights_again() -> None:
    relists = Relists()
    for key in (("ns", "a"), ("ns", "b")):
        relists.saw(None, key, known=False, synced=False)
    relists.saw("DELETED", ("ns", "a"), known=True, synced=True)
    relists.forgotten([("ns", "b")])
    relists.saw(None, ("ns", "a"), known=True, synced=False)  # recreated: kopf's worker sees it listed
    relists.saw(None, ("ns", "b"), known=True, synced=False)
    assert not relists.noticed


async def test_the_events_of_one_relist_are_waited_for_and_coalesced() -> None:
    relists = Relists()
    loop = asyncio.get_running_loop()
    relists.saw(None, ("ns", "a"), known=False, synced=True)
    waiter = asyncio.create_task(relists.settled(settle=0.5, at_most=30))
    last = loop.time()
    for index in range(6):  # a re-list's events, 0.05 s apart: far closer than the quiet period
        await asyncio.sleep(0.05)
        assert not waiter.done()
        relists.saw(None, ("ns", f"o{index}"), known=False, synced=True)
        last = loop.time()
    await asyncio.wait_for(waiter, 5)
    assert loop.time() - last >= 0.5  # returned once they had stopped, not before
    assert not relists.noticed  # one listing for all of them


async def test_a_busy_watch_does_not_put_the_listing_off() -> None:
    relists = Relists()
    relists.saw(None, ("ns", "a"), known=False, synced=True)
    waiter = asyncio.create_task(relists.settled(settle=0.5, at_most=0.3))
    began = asyncio.get_running_loop().time()
    index = 0
    while not waiter.done():  # events never stop coming
        index += 1
        relists.saw(None, ("ns", f"o{index}"), known=False, synced=True)
        await asyncio.wait({waiter}, timeout=0.05)
        assert asyncio.get_running_loop().time() - began < 5, "the listing was put off while events kept coming"
