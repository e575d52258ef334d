"""The engine's production hardening: failures counted, refreshes bounded, benign edits keep the
value, the drain at shutdown, values masked in every repr, refused status writes not retried hot."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from connector_credentials.api.conditions import Reason, find_condition
from connector_credentials.api.values import SecretValue
from connector_credentials.api.wire import RenderedBody, render_credential
from connector_credentials.cli.logs import RedactingFilter
from connector_credentials.config.settings import OperatorSettings
from connector_credentials.core.answers import SHUTTING_DOWN
from connector_credentials.core.engine import Engine
from connector_credentials.core.entry import Entry, Held, Served
from connector_credentials.core.failures import AwsFailure
from connector_credentials.core.ports import FetchedSecret, SecretsPort
from connector_credentials.core.status_queue import Lane
from tests.support.fakes import ARN, VALUE, FakePort, FakeSink, body, settle

CANARY = "CANARY-hardening-5f0c2e9a1b7d4c3e"


def make(settings: OperatorSettings, port: SecretsPort | None = None) -> tuple[Engine, Any, FakeSink]:
    sink = FakeSink()
    engine = Engine(settings, port or FakePort(), sink)
    engine.synced.set()
    return engine, engine._port, sink


def base_settings(**overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "default_refresh_interval": 300,
        "max_staleness": 900,
        "backoff_base": 1,
        "backoff_cap": 60,
        "socket_path": "/nonexistent",
    }
    values.update(overrides)
    return OperatorSettings(**values)


# --- 2. an unexpected error is not a hot loop -----------------------------------------------------


class ExplodingPort(FakePort):
    """Succeeds once, then raises something the engine does not expect, recording when."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def get_secret(
        self, arn: Any, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        self.times.append(time.monotonic())
        if len(self.times) > 1:
            raise ZeroDivisionError(CANARY)  # the text must not reach the log
        return super().get_secret(arn, version_id=version_id, version_stage=version_stage)


async def test_an_unexpected_failure_counts_backs_off_and_keeps_the_verdict(caplog: pytest.LogCaptureFixture) -> None:
    port = ExplodingPort()
    engine, _, sink = make(base_settings(backoff_base=1, backoff_cap=60), port)
    try:
        engine.upsert(body({"secretArn": ARN, "refreshInterval": "5s"}))
        await settle(engine)
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None
        delays = []
        for failures in range(1, 5):
            await engine.check(entry)  # now (instead of waiting the backoff out): the read raises
            assert entry.schedule.failures == failures
            delays.append(entry.schedule.due - asyncio.get_running_loop().time())
        # Equal-jitter exponential backoff: [0.5, 1], [1, 2], [2, 4], [4, 8] seconds, plus the batch
        # window (2 % of the 5 s interval) within which the retry may leave with others.
        for failures, delay in enumerate(delays, start=1):
            step = 2.0 ** (failures - 1)
            assert step / 2 - 0.1 <= delay <= step + 0.1, (failures, delays)
        assert entry.schedule.outcome is not None and entry.schedule.outcome.reason == Reason.ACCESS_VERIFIED
        ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
        assert ready is not None and ready["reason"] == "AccessVerified"
        lines = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
        assert len(lines) == 4 and all("ZeroDivisionError" in r.getMessage() for r in lines)
        assert all(r.exc_info is None for r in lines)
        assert CANARY not in caplog.text
    finally:
        await engine.close()


async def test_json_nested_beyond_the_decoder_is_json_key_not_found() -> None:
    engine, port, _ = make(base_settings())
    try:
        port.answer = FetchedSecret("v1", "[" * 5000, ("AWSCURRENT",))
        engine.upsert(body({"secretArn": ARN, "jsonKey": "token"}))
        await settle(engine)
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None and entry.schedule.outcome is not None
        assert entry.schedule.outcome.reason == Reason.JSON_KEY_NOT_FOUND
        served = await engine.serve("team-a", "slack", refresh=False)
        assert (served.status, served.reason) == (502, "JsonKeyNotFound")
        assert port.calls == 1
    finally:
        await engine.close()


# --- 3. ?refresh=true respects the backoff and the minimum gap ---------------------------------------


class GatedPort(FakePort):
    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def get_secret(
        self, arn: Any, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        if self.gate is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.gate.wait(), self.loop).result(5)
        return super().get_secret(arn, version_id=version_id, version_stage=version_stage)


async def test_refresh_requests_share_one_read_per_gap() -> None:
    port = GatedPort()
    engine, _, _ = make(base_settings(min_refresh_gap=0.5), port)
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        assert port.calls == 1
        loop = asyncio.get_running_loop()
        # Right after a read: a refresh waits for the end of the gap, then reads (a value read after it asked).
        began = loop.time()
        port.answer = FetchedSecret("v2", "CANARY-after-the-gap", ("AWSCURRENT",))
        served = await engine.serve("team-a", "slack", refresh=True)
        assert served.value is not None and served.value.reveal() == "CANARY-after-the-gap"
        assert port.calls == 2 and loop.time() - began >= 0.4
        # Twenty refresh requests at once, within the gap: one read, shared by all of them.
        port.gate, port.loop = asyncio.Event(), loop
        many = [asyncio.create_task(engine.serve("team-a", "slack", refresh=True)) for _ in range(20)]
        await asyncio.sleep(0.7)  # past the gap: the read has started and waits at the gate
        port.gate.set()
        answers = await asyncio.gather(*many)
        assert {a.status for a in answers} == {200}
        assert port.calls == 3
    finally:
        await engine.close()


async def test_refresh_while_backing_off_does_not_call_aws() -> None:
    engine, port, _ = make(base_settings(min_refresh_gap=0))
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        port.answer = AwsFailure(Reason.THROTTLED, "slow down")
        await engine.serve("team-a", "slack", refresh=True)  # fails: backoff starts, value kept
        calls = port.calls
        for _ in range(10):
            served = await engine.serve("team-a", "slack", refresh=True)
            assert served.status == 200 and served.value is not None and served.value.reveal() == VALUE
        assert port.calls == calls
    finally:
        await engine.close()


# --- 4. a spec edit that does not change what is read keeps the value --------------------------------


async def test_an_interval_edit_during_an_outage_keeps_value_and_verdict() -> None:
    engine, port, sink = make(base_settings())
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        port.answer = AwsFailure(Reason.AWS_UNAVAILABLE, "Secrets Manager failed to answer")
        calls = port.calls
        engine.upsert(body({"secretArn": ARN, "refreshInterval": "30s"}, generation=2))
        await settle(engine)
        assert port.calls == calls  # rescheduled, not re-read
        status = sink.objects["team-a", "slack"]["status"]
        ready = find_condition(status["conditions"])
        assert ready is not None and (ready["status"], ready["reason"]) == ("True", "AccessVerified")
        assert "re-checked every 30s" in ready["message"]
        assert status["observedGeneration"] == 2
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None
        assert entry.schedule.due - asyncio.get_running_loop().time() <= 30 * 1.1 + 1
        assert [e[1] for e in sink.events] == ["AccessVerified"]
        # The first socket read checks AWS (down): the verified value is served, Ready stays True.
        served = await engine.serve("team-a", "slack", refresh=False)
        assert served.status == 200 and served.value is not None and served.value.reveal() == VALUE
        await settle(engine)
        ready = find_condition(sink.objects["team-a", "slack"]["status"]["conditions"])
        assert ready is not None and (ready["status"], ready["reason"]) == ("True", "AccessVerified")
    finally:
        await engine.close()


@pytest.mark.parametrize(
    "changed",
    [
        {"jsonKey": "token"},
        {"versionStage": "AWSPREVIOUS"},
        {"versionId": "a" * 32},
        {"secretArn": ARN.replace("slack-", "jira-")},
    ],
)
async def test_an_edit_of_what_is_read_drops_the_value(changed: dict[str, str]) -> None:
    engine, port, _ = make(base_settings())
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        port.answer = AwsFailure(Reason.AWS_UNAVAILABLE, "Secrets Manager failed to answer")
        engine.upsert(body({"secretArn": ARN, **changed}, generation=2))
        await settle(engine)
        served = await engine.serve("team-a", "slack", refresh=False)
        assert served.status == 503 and served.value is None
    finally:
        await engine.close()


# --- 1. the drain at shutdown ---------------------------------------------------------------------------


async def test_draining_serves_what_is_held_and_never_calls_aws() -> None:
    port = GatedPort()
    engine, _, sink = make(base_settings(), port)
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        port.gate, port.loop = asyncio.Event(), asyncio.get_running_loop()  # any new read would hang
        other = body({"secretArn": ARN.replace("slack-", "jira-")})
        other["metadata"]["name"] = "jira"
        engine.upsert(other)  # declared, its first read still under way
        await asyncio.sleep(0.05)
        await engine.drain()
        calls = port.calls
        assert engine.draining
        served = await engine.serve("team-a", "slack", refresh=False)
        assert served.status == 200 and served.value is not None
        assert engine.cached_body("team-a", "slack") is not None
        refreshed = await engine.serve("team-a", "slack", refresh=True)
        assert (refreshed.status, refreshed.reason, refreshed.retry_after) == (503, SHUTTING_DOWN, 1)
        unchecked = await engine.serve("team-a", "jira", refresh=False)
        assert (unchecked.status, unchecked.reason) == (503, SHUTTING_DOWN)
        assert (await engine.serve("team-a", "undeclared", refresh=False)).status == 404
        engine.upsert(body({"secretArn": ARN, "jsonKey": "x"}, generation=5))  # ignored while draining
        assert (await engine.serve("team-a", "slack", refresh=False)).status == 200
        assert port.calls == calls
        writes = len(sink.patches)
        await asyncio.sleep(0.05)
        assert len(sink.patches) == writes
    finally:
        if port.gate is not None:
            port.gate.set()
        await engine.close()
    assert [e for e in engine.entries() if e.held.value is not None] == []


# --- 5. no value through repr ------------------------------------------------------------------------------


def held_objects() -> dict[str, object]:
    value = SecretValue(CANARY)
    rendered = render_credential(value, "v1", ARN, datetime.datetime(2026, 1, 1))
    held = Held(value=value, body=rendered, version_id="v1")
    entry = Entry("team-a", "slack", held=held)
    served = Served(200, value=value, body=rendered, version_id="v1", arn=ARN)
    return {"value": value, "body": rendered, "held": held, "entry": entry, "served": served}


@pytest.mark.parametrize("name", ["value", "body", "held", "entry", "served"])
def test_no_repr_or_str_shows_the_value(name: str) -> None:
    obj = held_objects()[name]
    for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
        assert CANARY not in text, (name, text)
    assert isinstance(held_objects()["body"], RenderedBody)


def test_pytest_assertion_output_shows_no_value(tmp_path: Path) -> None:
    test = tmp_path / "test_leak.py"
    test.write_text(
        textwrap.dedent(
            """
            import os
            from connector_credentials.core.entry import Served
            from connector_credentials.api.values import SecretValue
            from connector_credentials.api.wire import render_credential
            import datetime

            def served(text):
                value = SecretValue(text)
                body = render_credential(value, "v1", "arn", datetime.datetime(2026, 1, 1))
                return Served(200, value=value, body=body)

            def test_compare():
                canary = os.environ["LEAK_CANARY"]  # not in this file's source, which pytest prints
                assert served(canary + "-a") == served(canary + "-b")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-vv", "-p", "no:cacheprovider", str(test)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "LEAK_CANARY": CANARY},
    )
    assert result.returncode == 1, result.stdout
    assert "AssertionError" in result.stdout or "assert" in result.stdout
    assert CANARY not in result.stdout + result.stderr


# --- 7. status writes refused for good are not retried hot --------------------------------------------------


class Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.reason = status, "Forbidden"


@pytest.mark.parametrize("status", [403, 404, 422])
async def test_a_refused_write_is_logged_once_and_retried_at_the_interval(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _, _ = make(base_settings(default_refresh_interval=120))
    try:
        engine.upsert(body({"secretArn": ARN}))
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None
        writer = engine._writer
        caplog.set_level(logging.WARNING)
        delays = [writer._after_failure(entry, Lane.STATUS, Refused(status), attempt) for attempt in (1, 2, 3)]
        assert delays == [120, 120, 120]
        assert sum("was refused (HTTP" in r.getMessage() for r in caplog.records) == 1
        transient = [writer._after_failure(entry, Lane.STATUS, Refused(code), 1) for code in (409, 429, 500, 503)]
        assert all(delay < 1 for delay in transient)
    finally:
        await engine.close()


class PortByArn(FakePort):
    """Answers each ARN with its own value."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__()
        self.values = values

    def get_secret(
        self, arn: Any, *, version_id: str | None, version_stage: str | None, role: Any = None
    ) -> FetchedSecret:
        self.calls += 1
        return FetchedSecret("v1", self.values[arn.arn], ("AWSCURRENT",))


def named(name: str, arn: str) -> dict[str, Any]:
    document = body({"secretArn": arn})
    document["metadata"].update(name=name, uid=f"uid-{name}")
    return document


async def test_the_redaction_index_follows_each_value_held_and_computes_only_the_changed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arns = [ARN.replace("slack-AbCdEf", f"app{n}-AbCdEf") for n in range(20)]
    port = PortByArn({arn: f"CANARY-value-{n:02d}" for n, arn in enumerate(arns)})
    engine, _, _ = make(base_settings(min_refresh_gap=0), port)
    computed: list[str] = []  # the values whose forms were computed (SecretValue.needles calls)
    original = SecretValue.needles

    def counting(value: SecretValue) -> tuple[str, ...]:
        computed.append(value.wire_text())
        return original(value)

    monkeypatch.setattr(SecretValue, "needles", counting)
    try:
        for n, arn in enumerate(arns):
            engine.upsert(named(f"app{n}", arn))
        engine.upsert(named("app0-again", arns[0]))  # a second credential reading the same secret
        await settle(engine)
        assert sorted(computed) == sorted(port.values.values())  # each distinct value once: no rebuilds
        log_filter = RedactingFilter(engine.redaction)
        leaked = ("CANARY-value-00", "CANARY-value-07")
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s %s", leaked, None)
        computed.clear()
        assert log_filter.filter(record) and record.getMessage() == "*** ***"
        await engine.serve("team-a", "app7", refresh=True)  # the same value read again: the index is untouched
        assert computed == []

        port.values[arns[7]] = "CANARY-rotated-07"
        await engine.serve("team-a", "app7", refresh=True)
        assert computed == ["CANARY-rotated-07", "CANARY-value-07"]  # the new one added, the old one dropped
        assert engine.redaction.redact("CANARY-value-07 CANARY-rotated-07") == "CANARY-value-07 ***"
        assert engine.redaction.redact("CANARY-value-06") == "***"

        engine.remove("team-a", "app0")
        assert engine.redaction.redact("CANARY-value-00") == "***"  # app0-again still holds it
        engine.remove("team-a", "app0-again")
        assert engine.redaction.redact("CANARY-value-00") == "CANARY-value-00"
        assert len(computed) == 3  # a value added or dropped: its forms only; a holder less: nothing
    finally:
        await engine.close()
    assert not engine.redaction and engine.redaction.needles() == frozenset()


async def test_a_check_that_changes_nothing_writes_only_the_heartbeat() -> None:
    engine, _, sink = make(base_settings(min_refresh_gap=0, status_heartbeat=600))
    try:
        engine.upsert(body({"secretArn": ARN}))
        await settle(engine)
        writes = len(sink.patches)
        for _ in range(3):
            await engine.serve("team-a", "slack", refresh=True)  # the same verdict again
        await settle(engine)
        assert len(sink.patches) == writes  # nothing changed: nothing written
        # Ten minutes later (the live lastCheckedTime is older than the heartbeat): that alone is written.
        old = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=11)).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = engine.get_entry("team-a", "slack")
        assert entry is not None
        entry.api.live_status["lastCheckedTime"] = old
        await engine.serve("team-a", "slack", refresh=True)
        await settle(engine)
        assert len(sink.patches) == writes + 1 and set(sink.patches[-1]) == {"lastCheckedTime"}
    finally:
        await engine.close()
