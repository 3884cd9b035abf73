"""/docs.json as the service really answers: BentoML documents every API with its own 400, 404 and
500 bodies, which our routes never send, and FastAPI documents its own 422 body on /v1; our routes
answer the error statuses of `STATUS_BY_ERROR_TYPE` with `{"error", "error_type"}` (on /v1, OpenAI's
`{"error": {"message", "type", "param", "code"}}`), the streaming routes answer server-sent events,
BentoML's task routes answer what its server really writes, and the schemas are OpenAPI 3.1's."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from _bentoml_impl.tasks.result import ResultStatus
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import STATUS_BY_ERROR_TYPE
from .openai_answers import OpenAIErrorResponse

DOCS_PATH = "/docs.json"
OPENAPI_VERSION = "3.1.0"
SCHEMAS_REF = "#/components/schemas/"
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
OPENAI_ERROR_SCHEMA_NAME = OpenAIErrorResponse.__name__
BEARER_SCHEME_NAME = "apiKey"
TASK_STATUS_SCHEMA_NAME = "TaskStatusResponse"
TASK_SUBMITTED_SCHEMA_NAME = "TaskSubmittedResponse"
TASK_SUBMITTED_SCHEMA = {
    "type": "object",
    "title": TASK_SUBMITTED_SCHEMA_NAME,
    "required": ["task_id", "status"],
    "properties": {
        "task_id": {"type": "string", "description": "for /status and /get"},
        "status": {"type": "string", "const": ResultStatus.IN_PROGRESS.value},
    },
}


def event_stream(data: str) -> dict[str, Any]:
    """A server-sent events media type whose schema is one event, as schemathesis reads event streams."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": data}, "event": {"type": "string"}},
    }
    return {"text/event-stream": {"schema": event}}


def pydantic_schemas(models: Iterable[type[BaseModel]]) -> dict[str, dict[str, Any]]:
    """The models' JSON Schemas as pydantic writes them, with the models they nest, by component name."""
    schemas: dict[str, dict[str, Any]] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=SCHEMAS_REF + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def error_responses(error_types: Iterable[str], schema_name: str) -> dict[str, dict[str, Any]]:
    """One documented response per status, naming the error types that answer it."""
    types_by_status: dict[int, list[str]] = {}
    for error_type in sorted(error_types):
        types_by_status.setdefault(STATUS_BY_ERROR_TYPE[error_type], []).append(error_type)
    return {
        str(status): {
            "description": "error_type: " + ", ".join(types),
            "content": {"application/json": {"schema": {"$ref": SCHEMAS_REF + schema_name}}},
        }
        for status, types in sorted(types_by_status.items())
    }


def json_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def either_response(responses: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """`responses` and `more` by status; where both document a status, it answers either one's body."""
    merged = dict(responses)
    for status, response in more.items():
        if status in merged:
            schemas = [answer["content"]["application/json"]["schema"] for answer in (merged[status], response)]
            response = json_response({"anyOf": schemas}, f"{merged[status]['description']}; {response['description']}")
        merged[status] = response
    return dict(sorted(merged.items()))


def document_task(spec: dict[str, Any], route: str) -> None:
    """BentoML documents the task's routes with answers its server does not give: /submit and /retry answer
    only the new task's id and `in_progress`, and /status the values of BentoML's `ResultStatus`. /get
    answers the task's own stored answer, success or error, or BentoML's 400 while the task runs and 404
    for an id it does not know; /submit answers BentoML's 500 where it cannot record the task."""
    paths = spec["paths"]
    task = paths[route]["post"]["responses"]
    bentoml_errors = paths[f"{route}/status"]["get"]["responses"]
    submitted = {"200": json_response({"$ref": SCHEMAS_REF + TASK_SUBMITTED_SCHEMA_NAME}, "the task is recorded and runs")}
    for action in ("submit", "retry"):
        paths[f"{route}/{action}"]["post"]["responses"].update(submitted)
    submit = paths[f"{route}/submit"]["post"]
    submit["responses"] = either_response(submit["responses"], {"500": bentoml_errors["500"]})
    result = paths[f"{route}/get"]["get"]
    own_errors = {status: answer for status, answer in result["responses"].items() if not status.startswith("2")}
    task_errors = {status: answer for status, answer in task.items() if not status.startswith("2")}
    result["responses"] = {"200": task["200"], **either_response(own_errors, task_errors)}
    statuses = spec["components"]["schemas"][TASK_STATUS_SCHEMA_NAME]["properties"]["status"]
    statuses["enum"] = [status.value for status in ResultStatus]


def whole_request_schemas(spec: dict[str, Any]) -> None:
    """BentoML inlines each API's request schema flattened, and flattening drops `null` from an
    optional field's `anyOf`; the same schema among the components is whole, so point there. A body
    with a required field is itself required: no body reads as `{}`, which lacks the field."""
    schemas = spec.get("components", {}).get("schemas", {})
    for path_item in spec["paths"].values():
        for operation in path_item.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            title = media.get("schema", {}).get("title") if media else None
            if title in schemas:
                media["schema"] = {"$ref": SCHEMAS_REF + title}
                if schemas[title].get("required"):
                    operation["requestBody"]["required"] = True


def require_api_key(spec: dict[str, Any], exempt: Iterable[str], openai_routes: set[str]) -> None:
    """Every route but `exempt` asks for a bearer key, and answers 401 `unauthorized` without a right one."""
    spec["components"]["securitySchemes"] = {
        BEARER_SCHEME_NAME: {"type": "http", "scheme": "bearer", "description": "one of API_KEYS or API_KEYS_FILE's keys"}
    }
    exempt = set(exempt)
    for route, path_item in spec["paths"].items():
        if route in exempt:
            continue
        refused = error_responses({"unauthorized"}, OPENAI_ERROR_SCHEMA_NAME if route in openai_routes else ERROR_SCHEMA_NAME)
        for operation in path_item.values():
            operation["security"] = [{BEARER_SCHEME_NAME: []}]
            operation["responses"] = either_response(operation["responses"], refused)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMAS_REF):
            yield ref.removeprefix(SCHEMAS_REF)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def without_unused_schemas(spec: dict[str, Any]) -> None:
    """Drops the component schemas that no route refers to any more (FastAPI's HTTPValidationError)."""
    schemas = spec["components"]["schemas"]
    used, pending = set(), list(_refs(spec["paths"]))
    while pending:
        name = pending.pop()
        if name not in used and name in schemas:
            used.add(name)
            pending.extend(_refs(schemas[name]))
    spec["components"]["schemas"] = {name: schema for name, schema in schemas.items() if name in used}


def document_errors(
    spec: dict[str, Any],
    errors_by_route: Mapping[str, Iterable[str]],
    event_stream_routes: Mapping[str, str] | None = None,
    openai_routes: Iterable[str] = (),
    exact_models: Iterable[type[BaseModel]] = (),
    answers: Mapping[str, Iterable[type[BaseModel]]] | None = None,
    unserved: Iterable[str] = (),
    task_routes: Iterable[str] = (),
    api_key_exempt: Iterable[str] | None = None,
) -> dict[str, Any]:
    """A copy of `spec` whose routes in `errors_by_route` list their success and the errors they answer,
    in OpenAI's shape on `openai_routes`, instead of the generic errors BentoML or FastAPI put there.
    `event_stream_routes` maps a route whose success is a server-sent event stream (beside JSON, if
    it documents JSON) to what each event's data holds. `exact_models` are served as pydantic writes
    them: BentoML and FastAPI round every numeric bound through a float (2**63 - 1 becomes 2**63).
    `answers` maps a route that answers one of several bodies to their models: BentoML documents
    only one body per API (it flattens a union to its first member). `unserved` routes are left out:
    BentoML declares them, but under `bentoml serve` they refuse every request. `task_routes` are
    BentoML tasks, documented by `document_task` from their own route's documentation. With API keys,
    `api_key_exempt` are the routes that need none (api/auth.py); None: no route needs a key."""
    spec = json.loads(json.dumps(spec))  # a deep copy, with statuses as JSON writes them: strings
    for route in unserved:
        spec["paths"].pop(route, None)
    # The schemas are pydantic's JSON Schema 2020-12 (`anyOf: [X, {type: null}]` for an optional field),
    # which is OpenAPI 3.1's dialect; BentoML labels the document 3.0.2, whose readers misread them.
    spec["openapi"] = OPENAPI_VERSION
    whole_request_schemas(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    answer_models = [model for models in (answers or {}).values() for model in models]
    schemas.update(
        {ERROR_SCHEMA_NAME: ERROR_SCHEMA, TASK_SUBMITTED_SCHEMA_NAME: TASK_SUBMITTED_SCHEMA, **pydantic_schemas([OpenAIErrorResponse, *exact_models, *answer_models])}
    )
    for route, models in (answers or {}).items():
        for operation in spec["paths"][route].values():
            success = {"anyOf": [{"$ref": SCHEMAS_REF + model.__name__} for model in models]}
            operation["responses"]["200"]["content"]["application/json"]["schema"] = success
    openai_routes = set(openai_routes)
    for route, error_types in errors_by_route.items():
        schema_name = OPENAI_ERROR_SCHEMA_NAME if route in openai_routes else ERROR_SCHEMA_NAME
        for operation in spec["paths"][route].values():
            successes = {status: answer for status, answer in operation["responses"].items() if status.startswith("2")}
            operation["responses"] = {**successes, **error_responses(error_types, schema_name)}
    for route, data in (event_stream_routes or {}).items():
        success = spec["paths"][route]["post"]["responses"]["200"]
        json_answer = {key: media for key, media in success["content"].items() if key == "application/json"}
        success["content"] = {**json_answer, **event_stream(data)}
    for route in task_routes:
        document_task(spec, route)
    if api_key_exempt is not None:
        require_api_key(spec, api_key_exempt, openai_routes)
    without_unused_schemas(spec)
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
