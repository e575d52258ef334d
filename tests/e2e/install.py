"""One install of the operator in the e2e namespace, and waiting for things to happen there."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from tests.e2e import fake_aws
from tests.e2e.clusters import NAMESPACE, REPO, Cluster


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 120, interval: float = 0.5) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})", pytrace=False)


@dataclass
class Install:
    """One install of the operator in ``NAMESPACE``: which overlay, and the samples' secret ARNs."""

    name: str
    cluster: Cluster
    arns: dict[str, str] = field(default_factory=dict)

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", NAMESPACE, *args, **kwargs)

    def pods(self) -> list[dict[str, Any]]:
        listed = self.cluster.json("-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=xpander-controller")
        if not listed["items"]:
            listed = self.cluster.json("-n", NAMESPACE, "get", "pods", "-l", "app=xpander-controller")
        return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]

    def pod(self) -> dict[str, Any]:
        return self.pods()[0]

    def exec(
        self, container: str, *command: str, check: bool = True, pod: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        target = f"pod/{pod}" if pod else "deploy/xpander-controller"
        return self.kubectl("exec", target, "-c", container, "--", *command, check=check)

    def ready_condition(self, name: str) -> dict[str, Any] | None:
        resource = self.cluster.json("-n", NAMESPACE, "get", "connectorcredential", name)
        for condition in resource.get("status", {}).get("conditions", []) or []:
            if condition.get("type") == "Ready":
                return dict(condition)
        return None


def apply_samples(install: Install) -> None:
    """deploy/samples as a user applies them, with the ARNs of the secrets the stand-in seeded
    (it gives every secret its own 6-character suffix, as AWS does)."""
    seeded = install.cluster.seeded_arns()
    docs = [
        doc
        for path in sorted((REPO / "deploy" / "samples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    for doc in docs:
        secret_name = doc["spec"]["secretArn"].split(":secret:", 1)[1][: -len("-AbCdEf")]
        doc["spec"]["secretArn"] = seeded.get(secret_name, doc["spec"]["secretArn"])
        install.arns[doc["metadata"]["name"]] = doc["spec"]["secretArn"]
    assert set(seeded) == {fake_aws.SLACK, fake_aws.JIRA, fake_aws.GITHUB, fake_aws.OTHER_TEAM}
    install.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
