"""The sidecar's own TCP ports (kopf's liveness endpoint, /metrics): a port already taken at start
stops the operator's console script with one error line naming the setting, and no traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.conftest import World
from tests.support.runner import OperatorProcess


@contextmanager
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another process (here, the test) is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


def error_lines(operator: OperatorProcess) -> list[str]:
    return [line for line in operator.output.splitlines() if line.startswith("Error:")]


def test_a_liveness_port_in_use_is_one_error_line_naming_the_setting(world: World) -> None:
    world.apply("slack", {"secretArn": world.secret("slack")})  # kopf would start at once: the CRD is served
    with taken_port() as port:
        url = f"http://127.0.0.1:{port}/healthz"
        operator = world.start_operator(args=("--liveness", url), wait=False)
        assert operator.wait(timeout=20) == 1, operator.output
    assert "Traceback" not in operator.output, operator.output
    [line] = error_lines(operator)
    assert line.startswith(f"Error: cannot serve the liveness endpoint on {url}: "), line
    assert "--liveness / CCRED_LIVENESS" in line, line
    assert "Serving credentials on" not in operator.output  # nothing was started before the check


def test_a_metrics_port_in_use_is_one_error_line_naming_the_setting(world: World) -> None:
    with taken_port() as port:
        operator = world.start_operator(extra_env={"CCRED_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}"}, wait=False)
        assert operator.wait(timeout=20) == 1, operator.output
    assert "Traceback" not in operator.output, operator.output
    [line] = error_lines(operator)
    assert line.startswith(f"Error: cannot serve metrics on 127.0.0.1:{port}: "), line
    assert "--metrics-bind-address / CCRED_METRICS_BIND_ADDRESS" in line, line
