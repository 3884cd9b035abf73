"""Schemathesis drives every route of ours from the service's own OpenAPI document (/docs.json), the
OpenAI-compatible ones on /v1 and BentoML's task routes included: no generated request, valid or not, may
get a server error, an undocumented status, content type or body, or slip past validation, and no route
may refuse every request its document calls valid. schemathesis.toml gives each request the longest
`timeout` the service allows, so no 5xx is expected. FUZZ_EXAMPLES sets the cases per operation (25 here;
the full run is scripts/fuzz.py)."""

from __future__ import annotations

import os
import time
from collections import Counter

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
from schemathesis.config import SchemathesisConfig

from tests.conftest import ROOT

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
    "/generate-task",
    "/generate-task/submit",
    "/generate-task/status",
    "/generate-task/get",
    "/generate-task/retry",
}
CONFIG_PATH = ROOT / "schemathesis.toml"
# Answers that call a request invalid; a 404 only says that a generated name names nothing real.
REFUSED_AS_INVALID = {400, 413, 422}
TASK_FINISH_BOUND_S = 120
# Routes that accept a batch before answering it: a task's answer comes from /generate-task/get.
ANSWERED_LATER = {"/generate-task/submit"}
CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]


def check_no_server_error(case, response) -> None:
    """Error bodies are checked by response_schema_conformance against the documented error schema."""
    assert response.status_code < 500, f"{case.method} {case.path} {case.query!r} {case.body!r}: {response.status_code} {response.text}"


def check_some_valid_request_accepted(operation, statuses: Counter) -> None:
    """Schemathesis' "schema validation mismatch": the route refused every request its document calls
    valid, as invalid; the document promises what validation does not take."""
    accepted = sum(count for status, count in statuses.items() if status < 400)
    refused = sum(count for status, count in statuses.items() if status in REFUSED_AS_INVALID)
    assert accepted or not refused, f"{operation.method.upper()} {operation.path} refused every valid request: {dict(statuses)}"


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
    if isinstance(case.body.get("items"), list) and case.path not in ANSWERED_LATER:
        check_bad_items_answered_alone(case.body["items"], response.json()["results"], body_schema, document)


def check_bad_items_answered_alone(items: list, results: list, body_schema: dict, document: dict) -> None:
    """A batch is accepted with bad items in it: each bad item is answered with its own error."""
    body = document["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[-1]]
    batch = next(option for option in body["properties"]["items"]["anyOf"] if option.get("type") == "array")
    item_validator = Draft202012Validator(batch["items"])
    for item, result in zip(items, results, strict=True):
        if not item_validator.is_valid(item):
            assert "error_type" in result, f"the bad item {item!r} got {result!r}"


def with_real_names(case, model_id: str, task_id: str) -> None:
    """/v1 names its model in every request and the task routes their task, and a generated name is almost
    never real (404): the served model's id and a finished task's put the case through generation, the
    model's card or the task's answer instead."""
    if case.path.startswith("/v1/"):
        if "model_id" in case.path_parameters:
            case.path_parameters["model_id"] = model_id
        elif isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model_id
    elif isinstance(case.query, dict) and "task_id" in case.query:
        case.query["task_id"] = task_id


def operations(url: str) -> list:
    """Ours, without BentoML's probes and metrics. Picked here: with `[[operations]]` in the configuration,
    schemathesis' own `include` selects every operation."""
    schema = schemathesis.openapi.from_url(f"{url}/docs.json", config=SchemathesisConfig.from_path(CONFIG_PATH))
    return [operation for operation in (result.ok() for result in schema.get_all_operations()) if operation.path in ROUTES]


def finished_task(url: str) -> str:
    """The id of a task that ran to its answer, submitted as a client would."""
    with httpx.Client(base_url=url, timeout=30) as http:
        task_id = http.post("/generate-task/submit", json={"query": "Say hi.", "max_length": 2}).json()["task_id"]
        deadline = time.monotonic() + TASK_FINISH_BOUND_S
        while (status := http.get("/generate-task/status", params={"task_id": task_id}).json()["status"]) == "in_progress":
            assert time.monotonic() < deadline, f"the task did not finish in {TASK_FINISH_BOUND_S}s"
            time.sleep(0.2)
    assert status == "completed", status
    return task_id


@pytest.fixture(scope="module")
def document(url) -> dict:
    return httpx.get(f"{url}/docs.json", timeout=30).json()


@pytest.fixture(scope="module")
def served_model(url) -> str:
    return httpx.get(f"{url}/models", timeout=30).json()["default_model_id"]


@pytest.fixture(scope="module")
def task_id(url) -> str:
    return finished_task(url)


@pytest.fixture(scope="module")
def fuzzed_operations(url) -> list:
    found = operations(url)
    assert {operation.path for operation in found} == ROUTES
    return found


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(
    fuzzed_operations, document, served_model, task_id, mode
):
    """Positive cases follow the schema; negative ones break it on purpose."""
    positive = mode is schemathesis.GenerationMode.POSITIVE
    for operation in fuzzed_operations:
        if not positive and operation.method.upper() == "GET" and not operation.query:
            continue  # no input to break but /v1's path model id, which any string satisfies
        statuses = Counter()

        @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case, real) -> None:
            if real:
                with_real_names(case, served_model, task_id)
            response = case.call(timeout=120)
            statuses[response.status_code] += 1
            check_no_server_error(case, response)
            case.validate_response(response, checks=CONFORMANCE)
            if not positive:
                check_accepted_only_if_valid(case, response, document)

        fuzz()
        if positive:
            check_some_valid_request_accepted(operation, statuses)
