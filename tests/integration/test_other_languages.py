"""docs/client.md's Go and Node examples, extracted from the document as they are and run against
a live operator: a text value, a binary one, and a refusal. Skipped only where the toolchain is
missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import World

ROOT = Path(__file__).resolve().parents[2]


def _example(language: str) -> str:
    text = (ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"docs/client.md should hold one {language} example"
    return str(blocks[0])


@pytest.mark.parametrize(
    ("language", "tool", "file_name", "build", "command"),
    [
        # Built, then run: `go run` reports the program's exit status as its own 1.
        (
            "go",
            "go",
            "read_credential.go",
            ["go", "build", "-o", "read_credential", "read_credential.go"],
            ["./read_credential"],
        ),
        ("js", "node", "read-credential.js", None, ["node", "read-credential.js"]),
    ],
)
def test_the_documented_example_reads_a_credential(
    world: World, tmp_path: Path, language: str, tool: str, file_name: str, build: list[str] | None, command: list[str]
) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    (tmp_path / file_name).write_text(_example(language))
    text, blob = world.serve_text_blob_and_denied(b"\x00\xff\xfe")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GOCACHE": os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build"),
        "GOTOOLCHAIN": "local",
        "CCRED_SOCKET_PATH": world.socket_path,
    }

    if build is not None:
        built = subprocess.run(build, cwd=tmp_path, env=env, capture_output=True, timeout=300, check=False)
        assert built.returncode == 0, built.stderr.decode()

    def run(name: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*command, world.namespace, name], cwd=tmp_path, env=env, capture_output=True, timeout=300, check=False
        )

    read = run("text")
    assert read.returncode == 0, read.stderr.decode()
    assert read.stdout == text.encode()
    read = run("blob")
    assert read.returncode == 0, read.stderr.decode()
    assert read.stdout == blob
    refused = run("denied")
    assert refused.returncode == 2
    assert refused.stderr.decode().startswith("502 AccessDenied: ")
    assert text not in refused.stderr.decode()
