"""/docs.json lists the errors each route really answers, in our error body (OpenAI's on /v1), the
streams as events, and request schemas that accept what the service accepts."""

from __future__ import annotations

import asyncio
import json

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from api.errors import STATUS_BY_ERROR_TYPE, error_response, openai_error_body
from api.openai import build_openai_app
from api.openai_schemas import ChatCompletionRequest, CompletionRequest
from api.openapi import ERROR_SCHEMA_NAME, OPENAI_ERROR_SCHEMA_NAME, DocumentedErrorsMiddleware, document_errors
from api.schemas import GenerateResponse, request_schemas
from settings import Settings

OPTIONAL_ID = {"anyOf": [{"type": "string"}, {"type": "null"}]}
OPENAI_ROUTES = {"/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions"}


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


def with_openai_app(spec: dict) -> dict:
    """The spec with the real /v1 app's paths and schemas merged in, as BentoML merges a mounted FastAPI app."""
    openai = build_openai_app(lambda: None, max_body_bytes=4096, stream_stall_timeout_s=10.0).openapi()
    spec["paths"].update({"/v1" + path: item for path, item in openai["paths"].items()})
    spec["components"]["schemas"].update(openai["components"]["schemas"])
    return spec


def served(**documented) -> dict:
    return document_errors(with_openai_app(bentoml_spec()), **documented)


def validator(spec: dict, schema_name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]})


def test_each_route_lists_the_statuses_of_its_error_types_and_no_others():
    spec = document_errors(
        bentoml_spec(),
        errors_by_route={"/generate": {"overloaded", "validation_error", "model_unloading", "engine_unavailable"}, "/health": {"engine_unavailable"}},
        event_stream_routes={"/generate/stream": "events"},
    )
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert sorted(generate) == ["200", "422", "429", "503"]
    assert generate["503"]["description"] == "error_type: engine_unavailable, model_unloading"
    assert generate["429"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
    assert sorted(spec["paths"]["/health"]["get"]["responses"]) == ["200", "503"]
    error_schema = spec["components"]["schemas"][ERROR_SCHEMA_NAME]
    assert error_schema["required"] == ["error", "error_type"] and "overloaded" in error_schema["properties"]["error_type"]["enum"]


def test_routes_left_out_keep_bentomls_answers_and_the_stream_is_documented_as_events():
    spec = document_errors(bentoml_spec(), errors_by_route={}, event_stream_routes={"/generate/stream": "what data holds"})
    assert sorted(spec["paths"]["/generate-task/status"]["get"]["responses"]) == ["200", "400", "404", "500"]
    stream = spec["paths"]["/generate/stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"] and stream["text/event-stream"]["schema"]["required"] == ["data"]
    assert stream["text/event-stream"]["schema"]["properties"]["data"]["description"] == "what data holds"
    assert spec["openapi"] == "3.1.0"  # pydantic's `anyOf: [X, {type: null}]` is 3.1, not 3.0


def test_with_api_keys_every_route_but_the_exempt_asks_for_a_bearer_key_and_documents_its_401():
    spec = served(errors_by_route={"/generate": {"overloaded"}}, openai_routes=OPENAI_ROUTES, api_key_exempt={"/health"})

    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "one of API_KEYS or API_KEYS_FILE's keys"
    }
    assert "security" not in spec["paths"]["/health"]["get"] and "401" not in spec["paths"]["/health"]["get"]["responses"]
    for route, shape in (("/generate", ERROR_SCHEMA_NAME), ("/generate-task/status", ERROR_SCHEMA_NAME), ("/v1/models", OPENAI_ERROR_SCHEMA_NAME)):
        (operation,) = spec["paths"][route].values()
        assert operation["security"] == [{"apiKey": []}], route
        refused = operation["responses"]["401"]
        assert refused["description"] == "error_type: unauthorized"
        assert refused["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}, route
    assert sorted(spec["paths"]["/generate"]["post"]["responses"]) == ["200", "401", "429"]


def test_without_api_keys_no_route_asks_for_a_key():
    spec = served(errors_by_route={"/generate": {"overloaded"}}, openai_routes=OPENAI_ROUTES)

    assert "securitySchemes" not in spec["components"]
    operations = [operation for path_item in spec["paths"].values() for operation in path_item.values()]
    assert not any("security" in operation or "401" in operation["responses"] for operation in operations)


def test_a_route_bentomls_server_does_not_serve_is_not_documented():
    """Every PUT /generate-task/cancel answers 400 under `bentoml serve`: offering it documents
    requests that the service refuses whatever they hold."""
    declared = bentoml_spec()
    declared["paths"]["/generate-task/cancel"] = {"put": {"responses": {200: {"description": "ok"}}}}
    spec = document_errors(declared, errors_by_route={}, unserved=["/generate-task/cancel"])
    assert "/generate-task/cancel" not in spec["paths"]
    assert "/generate-task/status" in spec["paths"]


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


@pytest.mark.parametrize("required_fields, body_required", [(["query"], True), ([], False)])
def test_a_body_is_required_where_its_schema_requires_a_field(required_fields, body_required):
    """The service reads no body as `{}`: valid only where the schema requires no field."""
    declared = bentoml_spec()
    declared["components"]["schemas"]["GenerateRequest"]["required"] = required_fields
    spec = document_errors(declared, errors_by_route={})
    assert spec["paths"]["/generate"]["post"]["requestBody"].get("required", False) is body_required


@pytest.mark.parametrize("device", ["cpu", "auto", "mps", "cuda", "cuda:1", " CUDA:12 ", "Cpu\n", "tpu", "cuda:", "cuda:x", "", " ", None])
def test_the_documented_device_accepts_exactly_what_load_model_accepts(device):
    load_model = request_schemas(Settings()).load_model
    try:
        load_model.model_validate({"device": device})
        accepted = True
    except ValidationError:
        accepted = False
    assert Draft202012Validator(load_model.model_json_schema()).is_valid({"device": device}) == accepted


class TestOpenAIRoutes:
    def test_fastapis_422_gives_way_to_every_status_the_route_answers_in_openai_shape(self):
        spec = served(
            errors_by_route={
                "/v1/chat/completions": {"validation_error", "model_not_found", "overloaded", "generation_timeout"},
                "/v1/completions": {"validation_error"},
                "/v1/models/{model_id}": {"model_not_found", "engine_unavailable"},
                "/v1/models": {"engine_unavailable"},
            },
            openai_routes=OPENAI_ROUTES,
        )
        chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
        model = spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]
        assert sorted(chat) == ["200", "404", "422", "429", "504"]
        assert sorted(model) == ["200", "404", "503"]  # FastAPI's 422 for the path parameter is gone: any string is valid
        openai_error = {"$ref": f"#/components/schemas/{OPENAI_ERROR_SCHEMA_NAME}"}
        assert all(chat[status]["content"]["application/json"]["schema"] == openai_error for status in ("404", "422", "429", "504"))
        assert "HTTPValidationError" not in spec["components"]["schemas"]  # no route refers to it any more
        assert chat["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}

    def test_a_route_that_streams_on_request_documents_json_and_events(self):
        spec = served(errors_by_route={}, event_stream_routes={"/v1/completions": "chunks, then [DONE]"})
        content = spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
        assert list(content) == ["application/json", "text/event-stream"]
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Completion"}

    @pytest.mark.parametrize("error_type", sorted(STATUS_BY_ERROR_TYPE))
    def test_the_documented_error_schemas_accept_the_bodies_the_service_builds(self, error_type):
        spec = served(errors_by_route={"/v1/models": {error_type}, "/generate": {error_type}}, openai_routes=OPENAI_ROUTES)
        ours = json.loads(error_response("message", error_type).body)
        openai = openai_error_body("message", error_type, param="messages.0.content")

        validator(spec, ERROR_SCHEMA_NAME).validate(ours)
        validator(spec, OPENAI_ERROR_SCHEMA_NAME).validate(openai)

    def test_the_openai_error_schema_refuses_our_own_error_shape(self):
        spec = served(errors_by_route={"/v1/models": {"overloaded"}}, openai_routes=OPENAI_ROUTES)
        assert not validator(spec, OPENAI_ERROR_SCHEMA_NAME).is_valid({"error": "busy", "error_type": "overloaded"})

    def test_exact_models_keep_bounds_that_a_float_cannot_hold(self):
        rounded = served(errors_by_route={})["components"]["schemas"]["ChatCompletionRequest"]
        exact = served(errors_by_route={}, exact_models=[ChatCompletionRequest])["components"]["schemas"]["ChatCompletionRequest"]
        assert rounded["properties"]["seed"]["anyOf"][0]["maximum"] == 2.0**63  # FastAPI's copy: 2**63 - 1 rounded up
        assert exact["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    "model, body",
    [
        (ChatCompletionRequest, {**CHAT, "stop": None}),
        (ChatCompletionRequest, {**CHAT, "stop": ["a", "b"]}),
        (ChatCompletionRequest, {**CHAT, "stop": ""}),
        (ChatCompletionRequest, {**CHAT, "n": 1}),
        (ChatCompletionRequest, {**CHAT, "n": 2}),
        (ChatCompletionRequest, {**CHAT, "frequency_penalty": 0}),
        (ChatCompletionRequest, {**CHAT, "frequency_penalty": 0.5}),
        (ChatCompletionRequest, {**CHAT, "frequency_penalty": False}),
        (ChatCompletionRequest, {**CHAT, "presence_penalty": "0"}),
        (ChatCompletionRequest, {**CHAT, "logit_bias": {}}),
        (ChatCompletionRequest, {**CHAT, "logit_bias": {"1": 2.0}}),
        (ChatCompletionRequest, {**CHAT, "logprobs": False}),
        (ChatCompletionRequest, {**CHAT, "logprobs": True}),
        (ChatCompletionRequest, {**CHAT, "seed": 2**63 - 1}),
        (ChatCompletionRequest, {**CHAT, "seed": 2**63}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}),
        (CompletionRequest, {**COMPLETION, "prompt": ["one"]}),
        (CompletionRequest, {**COMPLETION, "prompt": [""]}),
        (CompletionRequest, {**COMPLETION, "suffix": None}),
        (CompletionRequest, {**COMPLETION, "suffix": ""}),
        (CompletionRequest, {**COMPLETION, "echo": False}),
        (CompletionRequest, {**COMPLETION, "echo": 0}),
        (CompletionRequest, {**COMPLETION, "best_of": 1}),
        (CompletionRequest, {**COMPLETION, "best_of": 3}),
        (CompletionRequest, {**COMPLETION, "logprobs": 0}),
        (CompletionRequest, {**COMPLETION, "logprobs": False}),
        (ChatCompletionRequest, {**CHAT, "priority": "batch"}),
        (ChatCompletionRequest, {**CHAT, "priority": "urgent"}),
        (ChatCompletionRequest, {**CHAT, "priority": -100}),
        (ChatCompletionRequest, {**CHAT, "priority": 101}),
        (ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}}),
        (ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}),
        (ChatCompletionRequest, {**CHAT, "response_format": {"type": "xml"}}),
        (ChatCompletionRequest, {**CHAT, "guided_choice": ["yes", "no"]}),
        (ChatCompletionRequest, {**CHAT, "guided_choice": []}),
        (CompletionRequest, {**COMPLETION, "guided_regex": "[0-9]+"}),
        (CompletionRequest, {**COMPLETION, "logprobs": 21}),
    ],
)
def test_the_documented_request_schema_accepts_exactly_what_the_service_accepts(model, body):
    spec = served(errors_by_route={}, exact_models=[ChatCompletionRequest, CompletionRequest])
    try:
        model.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert validator(spec, model.__name__).is_valid(body) == accepted


def test_a_route_with_several_answers_documents_each():
    class Single(BaseModel):
        result: str

    class Batch(BaseModel):
        results: list[Single]

    spec = bentoml_spec()
    spec["paths"]["/generate"]["post"]["responses"][200]["content"] = {"application/json": {"schema": {"title": "x"}}}

    documented = document_errors(spec, errors_by_route={}, answers={"/generate": (Single, Batch)})

    answer = documented["paths"]["/generate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"anyOf": [{"$ref": "#/components/schemas/Single"}, {"$ref": "#/components/schemas/Batch"}]}
    check = Draft202012Validator({**answer, "components": documented["components"]})
    assert check.is_valid({"result": "yes"}) and check.is_valid({"results": [{"result": "no"}]})
    assert not check.is_valid({"results": "no"})


def task_spec() -> dict:
    """A task's routes as BentoML 1.4 documents them: each with its generic 400, 404 and 500."""
    bentoml_errors = {
        str(status): {"description": name, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
        for status, name in ((400, "InvalidArgument"), (404, "NotFound"), (500, "InternalServerError"))
    }
    bentoml_status = {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskStatusResponse"}}}}
    answer = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
    status_values = ["in_progress", "success", "failure", "cancelled"]
    return {
        "openapi": "3.0.2",
        "paths": {
            "/task": {"post": {"responses": {"200": answer, **bentoml_errors}}},
            "/task/submit": {"post": {"responses": {"200": bentoml_status, **bentoml_errors}}},
            "/task/retry": {"post": {"responses": {"200": bentoml_status, **bentoml_errors}}},
            "/task/status": {"get": {"responses": {"200": bentoml_status, **bentoml_errors}}},
            "/task/get": {"get": {"responses": {"200": answer, **bentoml_errors}}},
        },
        "components": {
            "schemas": {
                "TaskStatusResponse": {"type": "object", "properties": {"status": {"type": "string", "enum": status_values}}},
                **dict.fromkeys(("InvalidArgument", "NotFound", "InternalServerError"), error),
            }
        },
    }


class TestTaskRoutes:
    """What BentoML's server answers on a task's routes (bentoml 1.4's _bentoml_impl/server/app.py)."""

    @staticmethod
    def documented() -> dict:
        errors = {"/task": {"validation_error", "model_not_found", "generation_timeout"}, "/task/submit": {"validation_error"}}
        return document_errors(task_spec(), errors_by_route=errors, answers={"/task": (GenerateResponse,)}, task_routes=["/task"])

    def answer_validator(self, spec: dict, route: str, method: str, status: str) -> Draft202012Validator:
        schema = spec["paths"][route][method]["responses"][status]["content"]["application/json"]["schema"]
        return Draft202012Validator({**schema, "components": spec["components"]})

    def test_submit_and_retry_answer_the_new_tasks_id_and_in_progress_only(self):
        spec = self.documented()
        for route in ("/task/submit", "/task/retry"):
            answer = self.answer_validator(spec, route, "post", "200")
            assert answer.is_valid({"task_id": "0c50", "status": "in_progress"})
            assert not answer.is_valid({"task_id": "0c50", "status": "completed"})

    def test_submit_answers_its_refusals_and_bentomls_500_where_the_task_cannot_be_recorded(self):
        responses = self.documented()["paths"]["/task/submit"]["post"]["responses"]
        assert sorted(responses) == ["200", "422", "500"]
        assert self.answer_validator(self.documented(), "/task/submit", "post", "500").is_valid({"error": "database is locked"})

    def test_status_answers_the_values_bentomls_server_writes(self):
        answer = self.answer_validator(self.documented(), "/task/status", "get", "200")
        for status in ("in_progress", "completed", "failed"):
            assert answer.is_valid({"status": status})
        assert not answer.is_valid({"status": "success"})  # what BentoML documents, and never writes

    def test_get_answers_the_tasks_own_answer_or_error_and_bentomls_for_an_unknown_or_unfinished_task(self):
        spec = self.documented()
        responses = spec["paths"]["/task/get"]["get"]["responses"]
        assert sorted(responses) == ["200", "400", "404", "422", "500", "504"]
        assert responses["200"] == spec["paths"]["/task"]["post"]["responses"]["200"]
        not_found = self.answer_validator(spec, "/task/get", "get", "404")
        assert not_found.is_valid({"error": "task_id not found"})
        assert not_found.is_valid({"error": "model_id 'x' is not in the model store", "error_type": "model_not_found"})
        assert self.answer_validator(spec, "/task/get", "get", "504").is_valid({"error": "timeout", "error_type": "generation_timeout"})
