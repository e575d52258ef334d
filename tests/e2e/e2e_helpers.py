"""Shared helpers for the e2e tests: running tools, skipping when they are missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("E2E_KIND_CLUSTER", "ccred-e2e")
#: Every kubectl call names this context, so the tests never touch another cluster.
CONTEXT = f"kind-{CLUSTER}"
NAMESPACE = "xpander"
OPERATOR_IMAGE = "connector-credential-operator:e2e"
FAKE_AWS_IMAGE = "ccred-fake-aws:e2e"
SOCKET = "/var/run/connector-credentials/credentials.sock"


def missing_tools(*tools: str) -> str | None:
    """Why the tools cannot be used, or ``None``. ``docker`` also needs a reachable engine."""
    problems = [f"`{tool}` is not on PATH" for tool in tools if shutil.which(tool) is None]
    if "docker" in tools and shutil.which("docker") is not None:
        try:
            info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            problems.append("`docker info` timed out (the Docker engine is not answering)")
        else:
            if info.returncode != 0:
                problems.append("`docker info` failed (the Docker engine is not running or not reachable)")
    return "; ".join(problems) or None


def require_tools(*tools: str) -> None:
    why = missing_tools(*tools)
    if why is not None:
        pytest.skip(f"e2e needs {', '.join(tools)}: {why}")


def run(
    *args: str, check: bool = True, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a command in the repository root; on failure, fail with its output."""
    done = subprocess.run(
        list(args), cwd=REPO, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"`{' '.join(args)}` exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}",
            pytrace=False,
        )
    return done


def kubectl(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("kubectl", "--context", CONTEXT, *args, **kwargs)


def kube_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def ready_condition(name: str) -> dict[str, Any] | None:
    resource = kube_json("-n", NAMESPACE, "get", "connectorcredential", name)
    for condition in resource.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "Ready":
            return dict(condition)
    return None


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 180, interval: float = 2) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with diagnostics otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})\n{diagnostics()}", pytrace=False)


def diagnostics() -> str:
    """What to look at when something did not happen in time."""
    parts = []
    for args in (
        ("-n", NAMESPACE, "get", "pods,connectorcredentials", "-o", "wide"),
        ("-n", NAMESPACE, "describe", "connectorcredentials"),
        ("-n", NAMESPACE, "logs", "deploy/xpander-controller", "-c", "connector-credentials", "--tail=80"),
        ("-n", NAMESPACE, "logs", "deploy/xpander-controller", "-c", "controller", "--tail=20"),
        ("-n", NAMESPACE, "logs", "deploy/moto", "--tail=40"),
        ("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"),
    ):
        done = kubectl(*args, check=False, timeout=60)
        parts.append(f"--- kubectl {' '.join(args)}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


def sample_manifests() -> list[dict[str, Any]]:
    """The objects of deploy/samples/*.yaml (what `kubectl apply -f deploy/samples/` applies)."""
    paths = sorted((REPO / "deploy" / "samples").glob("*.yaml"))
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
