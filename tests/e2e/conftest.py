"""End-to-end tests in real pods: opt in with ``E2E=1`` (``make e2e`` / ``tests/e2e/run.sh`` sets it).

Without it every test here is skipped, so ``pytest tests`` stays fast and needs no root.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clusters import NAMESPACE, Cluster, Kind, LocalNode
from tests.e2e.install import Install, apply_samples

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("E2E") == "1":
        return
    skip = pytest.mark.skip(reason="e2e tests are opt-in: run `make e2e` (tests/e2e/run.sh), which sets E2E=1")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    if os.environ.get("E2E_CLUSTER", "localnode") == "kind":
        return Kind(tmp_path_factory.mktemp("kind"))
    return LocalNode()


@pytest.fixture(scope="module", params=["deploy", "existing-controller"])
def install(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[Install]:
    """The shipped install (deploy/), then the sidecar added to an existing Deployment
    (deploy/examples/existing-controller): every test of the module runs against each."""
    installed = Install(request.param, cluster)
    overlay = cluster.overlay(request.param)
    if request.param == "existing-controller":  # it brings no Namespace: yours exists already
        cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("apply", "-k", str(overlay))
    cluster.kubectl("wait", "--for=condition=Established", "crd/connectorcredentials.connectors.xpander.ai")
    apply_samples(installed)
    installed.kubectl("rollout", "status", "deploy/xpander-controller", "--timeout=180s", timeout=200)
    yield installed
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=120s", check=False, timeout=150)


@pytest.fixture
def canary() -> str:
    return f"ccred-canary-{uuid.uuid4().hex}"
