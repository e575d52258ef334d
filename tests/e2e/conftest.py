"""End-to-end tests on a kind cluster: opt in with ``E2E=1`` (``tests/e2e/run.sh`` sets it).

Without it every test here is skipped, so ``pytest tests`` stays fast and offline. With it,
the tests still skip when the tools they need are missing (see ``e2e_helpers.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("E2E") == "1":
        return
    skip = pytest.mark.skip(
        reason="e2e tests are opt-in: set E2E=1, or run `make e2e` (tests/e2e/run.sh: kind + Docker)"
    )
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)
