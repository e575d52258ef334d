"""The event loop the operator runs on, as a user sees it: uvloop by default (the test extra installs it,
as the image does), the standard loop with ``CCRED_EVENT_LOOP=asyncio``. On either it serves over the
socket, takes SIGTERM and SIGINT from kopf (it installs its handlers after kopf's), drains and exits 0."""

from __future__ import annotations

import signal
import time
from importlib.metadata import version

import pytest

from tests.integration.conftest import World

UVLOOP = f"Running on uvloop {version('uvloop')} (CCRED_EVENT_LOOP=auto)."
STANDARD = "Running on the standard asyncio event loop (CCRED_EVENT_LOOP=asyncio)."


@pytest.mark.parametrize(
    ("env", "said", "sig"),
    [
        ({}, UVLOOP, signal.SIGTERM),
        ({"CCRED_EVENT_LOOP": "asyncio"}, STANDARD, signal.SIGTERM),
        ({}, UVLOOP, signal.SIGINT),
    ],
    ids=["default-uvloop-sigterm", "asyncio-sigterm", "default-uvloop-sigint"],
)
def test_serves_on_the_loop_it_says_and_drains_on_a_signal(
    world: World, env: dict[str, str], said: str, sig: signal.Signals
) -> None:
    value = world.canary("loop")
    world.apply("slack", {"secretArn": world.secret("slack", string=value)})
    operator = world.start_operator(extra_env={"CCRED_SHUTDOWN_DRAIN": "2s", **env})
    assert said in operator.wait_for_log("Running on ", timeout=5)
    world.wait_reason("slack", "AccessVerified")
    with world.client() as client:
        assert client.get(world.namespace, "slack").value == value  # the first read (AWS)
        assert client.get(world.namespace, "slack").value == value  # from memory
        assert client.healthy()
        sent = time.monotonic()
        operator.send_signal(sig)
        operator.wait_for_log(f"Signal {sig.name} received: shutting down.", timeout=5)
        operator.wait_for_log("serving the values held for 2s more", timeout=5)
        assert client.get(world.namespace, "slack").value == value  # served through the drain
        code = operator.wait(timeout=15)
    elapsed = time.monotonic() - sent
    assert code == 0, operator.output[-3000:]
    # The drain, then a prompt exit: our handlers, not kopf's, took the signal on this loop too.
    assert 1.5 <= elapsed < 5, elapsed
    assert operator.output.count("Running on ") == 1
    assert "Traceback" not in operator.output
