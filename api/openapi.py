"""/docs.json as the service really answers: BentoML documents every API with its own 400, 404 and
500 bodies, which our routes never send; they answer the error statuses of `STATUS_BY_ERROR_TYPE`
with `{"error", "error_type"}`, the stream route answers server-sent events, and the schemas are
OpenAPI 3.1's."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import STATUS_BY_ERROR_TYPE

DOCS_PATH = "/docs.json"
OPENAPI_VERSION = "3.1.0"
ERROR_SCHEMA_NAME = "ErrorResponse"
ERROR_SCHEMA = {
    "type": "object",
    "title": ERROR_SCHEMA_NAME,
    "required": ["error", "error_type"],
    "properties": {
        "error": {"type": "string", "description": "what was refused and why: the field, the limit and the value"},
        "error_type": {"type": "string", "enum": sorted(STATUS_BY_ERROR_TYPE)},
    },
}
BENTOML_ERROR_STATUSES = ("400", "404", "500")
# The schema of one server-sent event, as schemathesis reads event streams.
SERVER_SENT_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'JSON: {"text"} as tokens come, then {"done": true, "result", "finish_reason", ...} '
            'with the usage, or {"error", "error_type"} when generation fails after the first token',
        },
        "event": {"type": "string"},
    },
}
EVENT_STREAM = {"text/event-stream": {"schema": SERVER_SENT_EVENT}}


def error_responses(error_types: Iterable[str]) -> dict[str, dict[str, Any]]:
    """One documented response per status, naming the error types that answer it."""
    types_by_status: dict[int, list[str]] = {}
    for error_type in sorted(error_types):
        types_by_status.setdefault(STATUS_BY_ERROR_TYPE[error_type], []).append(error_type)
    return {
        str(status): {
            "description": "error_type: " + ", ".join(types),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}}},
        }
        for status, types in sorted(types_by_status.items())
    }


def whole_request_schemas(spec: dict[str, Any]) -> None:
    """BentoML inlines each API's request schema flattened, and flattening drops `null` from an
    optional field's `anyOf`; the same schema among the components is whole, so point there."""
    schemas = spec.get("components", {}).get("schemas", {})
    for path_item in spec["paths"].values():
        for operation in path_item.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            title = media.get("schema", {}).get("title") if media else None
            if title in schemas:
                media["schema"] = {"$ref": f"#/components/schemas/{title}"}


def document_errors(
    spec: dict[str, Any], errors_by_route: dict[str, Iterable[str]], event_stream_routes: Iterable[str] = ()
) -> dict[str, Any]:
    """A copy of `spec` whose routes list the errors they answer instead of BentoML's generic ones."""
    spec = json.loads(json.dumps(spec))  # a deep copy, with statuses as JSON writes them: strings
    # The schemas are pydantic's JSON Schema 2020-12 (`anyOf: [X, {type: null}]` for an optional field),
    # which is OpenAPI 3.1's dialect; BentoML labels the document 3.0.2, whose readers misread them.
    spec["openapi"] = OPENAPI_VERSION
    whole_request_schemas(spec)
    spec.setdefault("components", {}).setdefault("schemas", {})[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    for route, error_types in errors_by_route.items():
        for operation in spec["paths"][route].values():
            responses = operation["responses"]
            for status in BENTOML_ERROR_STATUSES:
                responses.pop(status, None)
            responses.update(error_responses(error_types))
    for route in event_stream_routes:
        spec["paths"][route]["post"]["responses"]["200"]["content"] = EVENT_STREAM
    return spec


class DocumentedErrorsMiddleware:
    """Answers GET /docs.json with `document_errors` applied to BentoML's document, built once."""

    def __init__(self, app: ASGIApp, spec: Callable[[], dict[str, Any]], **documented: Any) -> None:
        self.app = app
        self._spec = spec
        self._documented = documented
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCS_PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(document_errors(self._spec(), **self._documented)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": self._body})
