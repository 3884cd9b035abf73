"""Schemathesis drives every POST API from the service's own OpenAPI document (/docs.json): no
generated request, valid or not, may get a server error. The one 5xx a request can earn is 504
when it set its own tiny `timeout`. FUZZ_EXAMPLES sets the cases per operation (25 here; the
full run is scripts/fuzz.py)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
OPERATIONS = r"^/(generate|generate/stream|load-model|unload-model|optimize-memory)$"


def check_no_server_error(case, response) -> None:
    if response.status_code == 504:
        assert isinstance(case.body, dict) and case.body.get("timeout") is not None, response.text
        assert response.json()["error_type"] == "generation_timeout"
        return
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert {"error", "error_type"} <= set(response.json()), response.text


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/docs.json").include(path_regex=OPERATIONS)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture(scope="module")
def fuzzed_operations(url) -> list:
    found = operations(url)
    assert {operation.path for operation in found} == {"/generate", "/generate/stream", "/load-model", "/unload-model", "/optimize-memory"}
    return found


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_no_generated_request_gets_a_server_error(fuzzed_operations, mode):
    """Positive cases follow the schema; negative ones break it on purpose."""
    for operation in fuzzed_operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            check_no_server_error(case, case.call(timeout=120))

        fuzz()
