"""/docs.json lists the errors each route really answers, in our error body, and the stream as events."""

from __future__ import annotations

import asyncio
import json

from api.openapi import ERROR_SCHEMA_NAME, DocumentedErrorsMiddleware, document_errors


OPTIONAL_ID = {"anyOf": [{"type": "string"}, {"type": "null"}]}


def bentoml_spec() -> dict:
    bentoml_errors = {status: {"description": "BentoML's"} for status in (400, 404, 500)}
    return {
        "openapi": "3.0.2",
        "paths": {
            "/generate": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": {"title": "GenerateRequest", "type": "object"}}}},
                    "responses": {200: {"description": "ok"}, **bentoml_errors},
                }
            },
            "/generate/stream": {"post": {"responses": {200: {"content": {"text/plain": {}}}, **bentoml_errors}}},
            "/health": {"get": {"responses": {"200": {"description": "ok"}}}},
            "/generate-task/status": {"get": {"responses": {200: {"description": "ok"}, **bentoml_errors}}},
        },
        "components": {"schemas": {"GenerateRequest": {"type": "object", "properties": {"model_id": OPTIONAL_ID}}}},
    }


def test_each_route_lists_the_statuses_of_its_error_types_and_no_others():
    spec = document_errors(
        bentoml_spec(),
        errors_by_route={"/generate": {"overloaded", "validation_error", "model_unloading", "engine_unavailable"}, "/health": {"engine_unavailable"}},
        event_stream_routes=["/generate/stream"],
    )
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert sorted(generate) == ["200", "422", "429", "503"]
    assert generate["503"]["description"] == "error_type: engine_unavailable, model_unloading"
    assert generate["429"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
    assert sorted(spec["paths"]["/health"]["get"]["responses"]) == ["200", "503"]
    error_schema = spec["components"]["schemas"][ERROR_SCHEMA_NAME]
    assert error_schema["required"] == ["error", "error_type"] and "overloaded" in error_schema["properties"]["error_type"]["enum"]


def test_routes_left_out_keep_bentomls_answers_and_the_stream_is_documented_as_events():
    spec = document_errors(bentoml_spec(), errors_by_route={}, event_stream_routes=["/generate/stream"])
    assert sorted(spec["paths"]["/generate-task/status"]["get"]["responses"]) == ["200", "400", "404", "500"]
    stream = spec["paths"]["/generate/stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"] and stream["text/event-stream"]["schema"]["required"] == ["data"]
    assert spec["openapi"] == "3.1.0"  # pydantic's `anyOf: [X, {type: null}]` is 3.1, not 3.0


def test_the_middleware_answers_docs_json_and_passes_everything_else_on():
    passed_on, sent = [], []

    async def app(scope, receive, send):
        passed_on.append(scope["path"])

    async def send(message):
        sent.append(message)

    middleware = DocumentedErrorsMiddleware(app, spec=bentoml_spec, errors_by_route={"/health": {"internal_error"}})
    for path in ("/docs.json", "/health"):
        asyncio.run(middleware({"type": "http", "method": "GET", "path": path}, None, send))
    assert passed_on == ["/health"]
    assert sent[0]["status"] == 200
    assert sorted(json.loads(sent[1]["body"])["paths"]["/health"]["get"]["responses"]) == ["200", "500"]


def test_a_request_body_points_at_its_whole_schema_where_bentoml_inlined_a_flattened_one():
    spec = document_errors(bentoml_spec(), errors_by_route={})
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    assert spec["components"]["schemas"]["GenerateRequest"]["properties"]["model_id"] == OPTIONAL_ID  # null stays allowed
