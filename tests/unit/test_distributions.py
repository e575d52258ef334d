"""The two distributions agree: one version, the operator pinning the client exactly, the socket
contract defined once (client/protocol.py) and documented once (client/openapi.json) in agreement
with the code and docs/reference.md."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path

from connector_credentials.api.conditions import Reason
from connector_credentials.api.version import __version__
from connector_credentials.client import protocol
from connector_credentials.config.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]


def _project(path: Path) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads(path.read_text())["project"]
    return project


def _openapi() -> dict[str, object]:
    loaded: dict[str, object] = json.loads(
        resources.files("connector_credentials.client").joinpath("openapi.json").read_text("utf-8")
    )
    return loaded


def test_one_version_and_an_exact_pin() -> None:
    operator, client = _project(ROOT / "pyproject.toml"), _project(ROOT / "client" / "pyproject.toml")
    assert operator["version"] == client["version"] == __version__ == _openapi()["info"]["version"]
    assert f"connector-credentials-client=={__version__}" in operator["dependencies"]


def test_the_client_distribution_has_no_dependency() -> None:
    client = _project(ROOT / "client" / "pyproject.toml")
    assert client["dependencies"] == []
    assert client["requires-python"] == ">=3.11"


def test_the_socket_path_is_defined_once() -> None:
    assert OperatorSettings.model_fields["socket_path"].default == protocol.DEFAULT_SOCKET_PATH
    sources = [*(ROOT / "operator").rglob("*.py"), *(ROOT / "client" / "src").rglob("*.py")]
    defining = [p.name for p in sources if protocol.DEFAULT_SOCKET_PATH in p.read_text()]
    assert defining == ["protocol.py"]


def test_the_document_names_the_protocol_paths() -> None:
    paths = set(_openapi()["paths"])
    assert paths == {
        f"{protocol.CREDENTIALS_PATH}/{{namespace}}/{{name}}",
        protocol.CREDENTIALS_PATH,
        protocol.HEALTHZ_PATH,
    }


def test_the_document_uses_the_protocol_patterns_and_refresh_and_watch_values() -> None:
    operation = _openapi()["paths"][f"{protocol.CREDENTIALS_PATH}/{{namespace}}/{{name}}"]["get"]
    parameters = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert parameters["namespace"]["pattern"] == protocol.NAMESPACE_PATTERN
    assert parameters["name"]["pattern"] == protocol.NAME_PATTERN
    assert set(parameters[protocol.REFRESH_PARAM]["enum"]) == set(protocol.REFRESH_VALUES)
    assert set(parameters[protocol.WATCH_PARAM]["enum"]) == set(protocol.WATCH_VALUES)
    stream = operation["responses"]["200"]["content"][protocol.WATCH_CONTENT_TYPE]["schema"]
    assert stream == {"$ref": "#/components/schemas/WatchEvent"}


def test_the_document_names_every_reason_of_the_code_and_of_the_reference() -> None:
    text = json.dumps(_openapi())
    failures = {reason.value for reason in Reason if reason is not Reason.ACCESS_VERIFIED}
    schemas = _openapi()["components"]["schemas"]
    assert set(schemas["CheckFailureReason"]["enum"]) == failures
    errors = {value for name, value in vars(protocol.ErrorReason).items() if not name.startswith("_")}
    for reason in errors:
        assert f'"{reason}"' in text, reason
    # Every status and reason of docs/reference.md's error table is in the document.
    reference = (ROOT / "docs" / "reference.md").read_text()
    table = reference[reference.index("Errors are `{") : reference.index("Limits: request line")]
    for status, reasons in re.findall(r"^\| (\d{3}) \| ([^|]*)\|", table, re.MULTILINE):
        assert f'"{status}"' in text, status
        for reason in re.findall(r"`(\w+)`", reasons):
            assert f'"{reason}"' in text, (status, reason)
