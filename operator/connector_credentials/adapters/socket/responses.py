"""What the credential server sends, built in one place: a credential's answer (for a plain GET and a
watch stream's line alike), errors and JSON documents; and how a failure to answer is logged.

A credential's answer is rendered once, by :func:`render`: a plain GET sends it as the response
(:func:`credential_response`), a watch wraps the same bytes in a line (``api.wire.watch_line``).
"""

from __future__ import annotations

import datetime
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from connector_credentials.api.wire import HEADERS, JSON_HEADERS, error_body, json_body, render_credential
from connector_credentials.core.engine import Served


@dataclass(frozen=True, slots=True, repr=False)
class Rendered:
    """A credential's answer as a plain GET sends it: the status, the body bytes (a 200's holds the
    value, so ``repr`` never shows them), and the ``Retry-After`` seconds of a 503."""

    status: int
    body: bytes
    retry_after: int | None = None

    def __repr__(self) -> str:
        return f"Rendered(status={self.status}, <{len(self.body)} bytes, masked>, retry_after={self.retry_after})"


def render(served: Served) -> Rendered:
    """The value (its body rendered at fetch time when the engine has it), or the verdict's error."""
    if served.status == 200 and served.value is not None:
        body = served.body or render_credential(
            served.value,
            served.version_id or "",
            served.arn or "",
            served.fetched_at or datetime.datetime.now(datetime.UTC),
        )
        return Rendered(200, body.data)
    return Rendered(
        served.status, error_body(served.reason or "Unknown", served.message or "").encode(), served.retry_after
    )


def credential_response(served: Served) -> web.Response:
    """The plain GET's response for a credential."""
    rendered = render(served)
    headers = JSON_HEADERS
    if rendered.retry_after is not None:
        headers = {**JSON_HEADERS, "Retry-After": str(rendered.retry_after)}
    return web.Response(status=rendered.status, body=rendered.body, headers=headers)


def error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=error_body(reason, message),
        content_type="application/json",
        headers={**HEADERS, **(headers or {})},
    )


def document(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json_body(payload), content_type="application/json", headers=HEADERS)


def failure(exc: BaseException) -> str:
    """An exception for the log without its message (which may quote the request): type and where."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    return f"{type(exc).__name__} at {where or 'unknown'}"
