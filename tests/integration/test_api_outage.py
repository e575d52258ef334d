"""A Kubernetes API outage longer than kopf's own retries (1 + 1 + 2 + 3 + 5 + 8 + 13 + 21 = 54 s):
the sidecar keeps serving what it holds, and watches again once the API is back."""

from __future__ import annotations

import time

from tests.integration.conftest import World
from tests.support.runner import wait_until

#: Longer than kopf's default retries, after which it used to give up and the operator to exit.
OUTAGE = 75.0


def test_an_api_outage_longer_than_kopfs_retries_does_not_stop_the_sidecar(world: World) -> None:
    first = world.secret("first")
    world.apply("first", {"secretArn": first})
    process = world.start_operator()
    world.wait_reason("first", "AccessVerified")
    value = world.canaries[0]

    outage = world.kube.fail_requests(None, r"^/api", status=503, times=None)
    began = time.monotonic()
    world.kube.drop_watches()
    with world.client() as client:

        def served_through_the_outage() -> bool:
            assert process.running, f"the operator exited during the outage:\n{process.output[-3000:]}"
            assert client.get(world.namespace, "first").value == value  # from memory, all along
            return time.monotonic() - began >= OUTAGE

        wait_until(served_through_the_outage, timeout=OUTAGE + 15, message="the outage's end")
    world.kube.remove_fault(outage)

    # Back: the watch resumes (kopf retries every 30 s at most) and sees what was declared meanwhile.
    world.apply("second", {"secretArn": world.secret("second")})
    world.wait_reason("second", "AccessVerified", timeout=60)
    with world.client() as client:
        assert client.get(world.namespace, "second").value == world.canaries[-1]
