"""The socket's OpenAPI document (shipped in the client package) as a checker of real answers:
does this status, these headers and this body belong to the document's answer for that request?

OpenAPI 3.1 schemas are JSON Schema 2020-12, so answers are checked with jsonschema, ``$ref``
resolved against the whole document.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.support.rawhttp import Reply

_URI = "urn:ccred:openapi"


def document() -> dict[str, Any]:
    """The OpenAPI document as the client distribution ships it."""
    text = resources.files("connector_credentials.client").joinpath("openapi.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def problems(doc: dict[str, Any], template: str, reply: Reply, method: str = "get") -> list[str]:
    """What in ``reply`` the document does not allow, for a request to ``template`` (empty: it conforms)."""
    operation = doc["paths"][template][method]
    if reply.status is None:
        return ["no answer"]
    answer = operation["responses"].get(str(reply.status))
    if answer is None:
        return [f"status {reply.status} is not documented for {method.upper()} {template}"]
    registry: Registry = Registry().with_resource(_URI, DRAFT202012.create_resource(doc))
    found: list[str] = []
    for name, declared in answer.get("headers", {}).items():
        header = _resolve(doc, declared)
        value = reply.headers.get(name.lower())
        if value is None:
            if header.get("required"):
                found.append(f"header {name} is missing")
            continue
        found += [f"header {name}: {e.message}" for e in _validator(header["schema"], registry).iter_errors(value)]
    media_type = reply.headers.get("content-type", "application/json").partition(";")[0].strip()
    contents = answer.get("content", {})
    content = contents.get(media_type)
    if content is None:
        return [*found, f"{media_type} is not documented for {reply.status}"] if contents else found
    if media_type == "application/x-ndjson":
        # A stream: each non-empty line is one document of the schema (an empty line is a heartbeat).
        documents = [line for line in reply.body.split(b"\n") if line]
        if not documents:
            return [*found, "the stream has no line"]
    else:
        documents = [reply.body]
    for index, text in enumerate(documents):
        try:
            document = json.loads(text)
        except ValueError:
            found.append(f"body (line {index}) is not JSON")
            continue
        found += [
            f"body (line {index}): {e.message} at {list(e.absolute_path)}"
            for e in _validator(content["schema"], registry).iter_errors(document)
        ]
    return found


def _validator(schema: dict[str, Any], registry: Registry) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**_rebase(schema)}, registry=registry)


def _rebase(schema: Any) -> Any:
    """Local ``#/...`` references point into the document, registered under ``_URI``."""
    if isinstance(schema, dict):
        return {k: (_URI + v if k == "$ref" and v.startswith("#") else _rebase(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase(item) for item in schema]
    return schema


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)
