"""The CRD in crds/ and the pydantic model must describe the same API."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from connector_credentials.api import models
from connector_credentials.api.conditions import Reason

CRD_PATH = Path(__file__).parents[3] / "crds" / "connectorcredentials.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    [only] = crd["spec"]["versions"]
    return only


def test_names(crd: dict[str, Any], version: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{models.PLURAL}.{models.GROUP}"
    assert spec["group"] == models.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == models.KIND
    assert spec["names"]["plural"] == models.PLURAL
    assert spec["names"]["singular"] == models.SINGULAR
    assert spec["names"]["shortNames"] == [models.SHORT_NAME]
    assert version["name"] == models.VERSION
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == ["Ready", "Reason", "Age", "Last Checked"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Last Checked"]["jsonPath"] == ".status.lastCheckedTime"


def test_spec_fields_match_the_model(version: dict[str, Any]) -> None:
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = models.ConnectorCredentialSpec.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == set(model["properties"])
    assert set(schema["required"]) == set(model["required"])
    for name, prop in schema["properties"].items():
        declared = model["properties"][name]
        variants = declared.get("anyOf", [declared])
        [string] = [v for v in variants if v.get("type") == "string"]
        for key in ("pattern", "maxLength", "minLength"):
            assert prop.get(key) == string.get(key), f"{name}.{key} differs between CRD and model"


def test_every_field_is_described(version: dict[str, Any]) -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        if path not in ("", ".metadata"):
            assert node.get("description"), f"{path or 'root'} has no description"
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(version["schema"]["openAPIV3Schema"], "")


def test_schema_validates_what_the_operator_needs(version: dict[str, Any]) -> None:
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert "!(has(self.versionStage) && has(self.versionId))" in rules
    interval = spec["properties"]["refreshInterval"]
    assert interval["x-kubernetes-validations"][0]["rule"] == "duration(self) >= duration('5s')"


def test_status_documents_every_reason(version: dict[str, Any]) -> None:
    reason = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]["items"]
    text = reason["properties"]["reason"]["description"]
    for item in Reason:
        assert item.value in text
