"""Background work under supervise(): a failure is logged by type and place and the work restarted,
after a backoff that doubles for a crash loop and starts afresh after a run that lasted."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from connector_credentials.core import supervise as supervising
from connector_credentials.core.supervise import supervise


async def test_a_crash_loop_backs_off_and_a_long_run_starts_the_backoff_afresh(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervising, "RESTART_BASE", 0.05)
    monkeypatch.setattr(supervising, "RESTART_CAP", 0.4)
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def run() -> None:
        starts.append(loop.time())
        if len(starts) == 5:
            await asyncio.sleep(0.45)  # lasted longer than the cap: a rare bug, not a crash loop
        if len(starts) < 7:
            raise KeyError("CANARY-in-a-bug")

    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(supervise("The test's work", run), 10)
    waits = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 7
    assert waits[0] < waits[1] < waits[2] < waits[3]  # 0.05, 0.1, 0.2, 0.4 (then 0.45 of running)
    assert waits[5] < 0.2, waits  # afresh: 0.05, not the cap
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 6 and all("The test's work failed unexpectedly (KeyError at" in line for line in said)
    assert not [line for line in said if "CANARY" in line]
