"""The client distribution on its own: its wheel, alone in a fresh virtual environment (no operator,
no pytest, no third-party package), reads credentials from a live operator.

``make test`` builds the wheels first (``make dist``: dist/); without them this test builds the
client's wheel itself. The tests it runs are client/tests/test_live.py, with the standard
library's unittest, under an import hook that refuses anything outside the standard library.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import World

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the client wheel and nothing else."""
    wheels = sorted((ROOT / "dist").glob("connector_credentials_client-*.whl"))
    if not wheels:
        out = tmp_path_factory.mktemp("wheel")
        subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT / "client")],
            check=True,
            capture_output=True,
            timeout=300,
        )
        wheels = sorted(out.glob("connector_credentials_client-*.whl"))
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-index: a dependency the wheel declared could not be found, and the install would fail.
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-index", str(wheels[-1])],
        check=True,
        timeout=120,
    )
    return venv


def test_the_client_wheel_declares_no_dependency(client_venv: Path) -> None:
    shown = subprocess.run(
        [client_venv / "bin" / "python", "-m", "pip", "show", "connector-credentials-client"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    fields = dict(line.split(": ", 1) for line in shown.splitlines() if ": " in line)
    assert fields.get("Requires", "") == "", shown
    frozen = subprocess.run(
        [client_venv / "bin" / "python", "-m", "pip", "freeze", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    installed = {re.split(r"==| @ ", line)[0].lower() for line in frozen if line}
    assert installed <= {"connector-credentials-client", "pip", "setuptools"}, installed


def test_the_client_wheel_alone_reads_from_a_live_operator(world: World, client_venv: Path) -> None:
    text, blob = world.serve_text_blob_and_denied(b"\x00\xff")
    expect = {
        "text": hashlib.sha256(text.encode()).hexdigest(),
        "blob": hashlib.sha256(blob).hexdigest(),
        "denied": "!AccessDenied",
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(world.workdir),
        "CCRED_SOCKET_PATH": world.socket_path,
        "CCRED_TEST_NAMESPACE": world.namespace,
        "CCRED_TEST_EXPECT": json.dumps(expect),
    }
    done = subprocess.run(
        # -I: isolated, so the checkout (its operator/ and client/src/) is not on the path: the wheel is.
        [client_venv / "bin" / "python", "-I", "-m", "unittest", "discover", "-v", "-s", ".", "-p", "test_live.py"],
        cwd=ROOT / "client" / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ran 7 tests" in done.stderr, done.stderr
    assert text not in done.stdout + done.stderr
