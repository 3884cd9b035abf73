"""Schemathesis drives every route of ours from the service's own OpenAPI document (/docs.json), the
OpenAI-compatible ones on /v1 included: no generated request, valid or not, may get a server error, an
undocumented status, content type or body, or slip past validation. The one 5xx a request can earn is
504 when it set its own tiny `timeout`. FUZZ_EXAMPLES sets the cases per operation (25 here; the full
run is scripts/fuzz.py)."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
ROUTES = {
    "/generate",
    "/classify",
    "/generate/stream",
    "/load-model",
    "/unload-model",
    "/optimize-memory",
    "/health",
    "/system-info",
    "/memory-usage",
    "/models",
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/chat/completions",
    "/v1/completions",
}
CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]


def check_no_server_error(case, response) -> None:
    """Error bodies are checked by response_schema_conformance against the documented error schema."""
    if response.status_code == 504:
        assert isinstance(case.body, dict) and case.body.get("timeout") is not None, response.text
        assert response.json()["error_type"] == "generation_timeout"
        return
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text}"


def check_accepted_only_if_valid(case, response, document: dict) -> None:
    """Schemathesis' own negative_data_rejection misfires here: it mutates the `string` branch of an
    optional field's `anyOf: [string, null]` to null and calls the valid result invalid. So a
    negative case we accept is checked against the document's schema itself."""
    if response.status_code >= 400 or not isinstance(case.body, dict):
        return
    # From the document as served: schemathesis rewrites its own copy of the schema while it mutates.
    operation = document["paths"][case.path][case.method.lower()]
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**body_schema, "components": document["components"]})
    problems = [error.message for error in validator.iter_errors(case.body) if list(error.absolute_path)[:1] != ["items"]]
    assert not problems, f"{case.path} accepted {case.body!r}: {problems}"
    if isinstance(case.body.get("items"), list):
        check_bad_items_answered_alone(case.body["items"], response.json()["results"], body_schema, document)


def check_bad_items_answered_alone(items: list, results: list, body_schema: dict, document: dict) -> None:
    """A batch is accepted with bad items in it: each bad item is answered with its own error."""
    body = document["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[-1]]
    batch = next(option for option in body["properties"]["items"]["anyOf"] if option.get("type") == "array")
    item_validator = Draft202012Validator(batch["items"])
    for item, result in zip(items, results, strict=True):
        if not item_validator.is_valid(item):
            assert "error_type" in result, f"the bad item {item!r} got {result!r}"


def with_served_model(case, model_id: str) -> None:
    """/v1 names its model in every request, and a generated name is almost never in the store (404):
    the served model's id puts the case through generation or the model's card instead."""
    if "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = model_id
    elif isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model_id


def operations(url: str) -> list:
    pattern = "^(" + "|".join(sorted(ROUTES)) + ")$"
    schema = schemathesis.openapi.from_url(f"{url}/docs.json").include(path_regex=pattern)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture(scope="module")
def document(url) -> dict:
    return httpx.get(f"{url}/docs.json", timeout=30).json()


@pytest.fixture(scope="module")
def served_model(url) -> str:
    return httpx.get(f"{url}/models", timeout=30).json()["default_model_id"]


@pytest.fixture(scope="module")
def fuzzed_operations(url) -> list:
    found = operations(url)
    assert {operation.path for operation in found} == ROUTES
    return found


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(fuzzed_operations, document, served_model, mode):
    """Positive cases follow the schema; negative ones break it on purpose."""
    for operation in fuzzed_operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # our GET routes take no input but /v1's path model id, which any string satisfies

        @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case, served) -> None:
            if served and case.path.startswith("/v1/"):
                with_served_model(case, served_model)
            response = case.call(timeout=120)
            check_no_server_error(case, response)
            case.validate_response(response, checks=CONFORMANCE)
            if mode is schemathesis.GenerationMode.NEGATIVE:
                check_accepted_only_if_valid(case, response, document)

        fuzz()
