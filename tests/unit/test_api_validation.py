"""RequestValidationMiddleware, as an ASGI app in front of a downstream app that echoes what it receives."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.schemas import request_schemas
from api.validation import RequestValidationMiddleware
from settings import Settings

MAX_BODY_BYTES = 4096


async def echo(request: Request) -> JSONResponse:
    """What the downstream app (BentoML, in the service) was given."""
    raw = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "content_type": request.headers.get("content-type"),
            "content_length": request.headers.get("content-length"),
            "body": raw.decode("latin-1"),
        }
    )


def make_client(max_body_bytes: int = MAX_BODY_BYTES) -> TestClient:
    """The middleware over the echo app; an exception escaping the middleware answers a bare 500, as in a server."""
    schemas = request_schemas(Settings())
    generate, load, unload = schemas.generate, schemas.load_model, schemas.unload_model
    downstream = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    app = RequestValidationMiddleware(
        downstream,
        schemas={"/generate": generate, "/load-model": load, "/unload-model": unload},
        max_body_bytes=max_body_bytes,
    )
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client() -> TestClient:
    return make_client()


def downstream_body(response) -> dict:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["body"])


def rejected(response, status: int = 422, error_type: str = "validation_error") -> str:
    """Asserts the response is the error shape; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    return body["error"]


class TestMalformedBodies:
    def test_invalid_json_is_rejected_naming_the_body(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", content=b'{"query": '))

        assert message.startswith("body: must be JSON")

    @pytest.mark.parametrize(
        "payload, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")]
    )
    def test_json_that_is_not_an_object_is_rejected(self, client: TestClient, payload: bytes, kind: str) -> None:
        message = rejected(client.post("/generate", content=payload))

        assert message == f"body: must be a JSON object, got {kind}"

    def test_invalid_utf8_is_rejected(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", content=b'{"query": "caf\xe9"}'))

        assert "body: must be UTF-8" in message

    def test_json_nested_too_deeply_to_parse_is_rejected(self) -> None:
        """BUG: json.loads raises RecursionError, which _parse does not catch: a bare 500 instead of a 422."""
        client = make_client(max_body_bytes=1_000_000)
        payload = b'{"query": "q", "context": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

        message = rejected(client.post("/generate", content=payload))

        assert message.startswith("body:")

    def test_an_integer_too_long_to_convert_is_rejected(self) -> None:
        """BUG: json.loads raises a plain ValueError past 4300 digits, which _parse does not catch: a bare 500."""
        client = make_client(max_body_bytes=1_000_000)
        payload = b'{"query": "q", "max_length": ' + b"1" * 5000 + b"}"

        message = rejected(client.post("/generate", content=payload))

        assert message.startswith("body:") or message.startswith("max_length:")

    def test_a_body_over_the_limit_is_413_payload_too_large(self) -> None:
        client = make_client(max_body_bytes=100)

        response = client.post("/generate", json={"query": "x" * 200})

        message = rejected(response, status=413, error_type="payload_too_large")
        assert "100 bytes" in message

    def test_a_body_at_the_limit_is_accepted(self) -> None:
        payload = b'{"query": "' + b"x" * 87 + b'"}'
        assert len(payload) == 100
        client = make_client(max_body_bytes=100)

        assert downstream_body(client.post("/generate", content=payload))["query"] == "x" * 87


class TestGenerateRequests:
    def test_a_valid_request_reaches_the_app_with_every_field(self, client: TestClient) -> None:
        response = client.post("/generate", json={"query": "What?", "context": ["a"], "max_length": 5})

        assert downstream_body(response) == {
            "query": "What?",
            "context": ["a"],
            "max_length": 5,
            "temperature": None,
            "model_id": None,
            "timeout": None,
            "use_async": True,
            "min_tokens": None,
            "ignore_eos": False,
            "items": None,
            "priority": None,
            "logprobs": False,
            "top_logprobs": None,
            "choices": None,
        }

    def test_the_app_gets_a_json_content_type_and_the_right_length(self, client: TestClient) -> None:
        echoed = client.post("/generate", content=b'{"query": "q"}', headers={"content-type": "text/plain"}).json()

        assert echoed["content_type"] == "application/json"
        assert int(echoed["content_length"]) == len(echoed["body"].encode("latin-1"))

    def test_an_unknown_field_is_rejected_by_name(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "prompt": "x"}))

        assert message == "prompt: unknown field"

    def test_a_missing_query_is_rejected(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={}))

        assert message == "query: required field is missing"

    def test_an_empty_body_is_a_missing_query(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", content=b""))

        assert message == "query: required field is missing"

    def test_max_length_over_the_limit_names_the_field_the_limit_and_the_value(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "max_length": 5000}))

        assert "max_length" in message
        assert "2048" in message
        assert "5000" in message

    @pytest.mark.parametrize("max_length", [0, -1])
    def test_max_length_below_one_is_rejected(self, client: TestClient, max_length: int) -> None:
        assert "max_length" in rejected(client.post("/generate", json={"query": "q", "max_length": max_length}))

    @pytest.mark.parametrize("temperature", [3, -0.5])
    def test_temperature_out_of_range_is_rejected_by_name(self, client: TestClient, temperature: float) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "temperature": temperature}))

        assert message.startswith("temperature:")
        assert str(temperature) in message

    @pytest.mark.parametrize("timeout", [True, "5"])
    def test_a_timeout_that_is_not_a_number_is_rejected(self, client: TestClient, timeout) -> None:
        """Found by the fuzz: lax, `true` passed as a timeout of 1 second."""
        assert rejected(client.post("/generate", json={"query": "q", "timeout": timeout})).startswith("timeout:")

    def test_a_nul_byte_in_the_query_is_rejected(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "a\x00b"}))

        assert message == "query: must not contain NUL characters"

    def test_a_nul_byte_in_a_context_passage_is_rejected(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "context": ["ok", "b\x00d"]}))

        assert message == "context.1: must not contain NUL characters"

    def test_an_empty_query_is_rejected(self, client: TestClient) -> None:
        assert rejected(client.post("/generate", json={"query": ""})).startswith("query:")

    def test_a_bad_model_id_is_rejected(self, client: TestClient) -> None:
        assert rejected(client.post("/generate", json={"query": "q", "model_id": "../etc"})).startswith("model_id:")

    def test_every_problem_is_reported(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "max_length": 5000, "temperature": 3}))

        assert "max_length" in message and "temperature" in message

    def test_a_long_value_is_shortened_in_the_message(self, client: TestClient) -> None:
        message = rejected(client.post("/generate", json={"query": "q", "model_id": "X" * 500}))

        assert "(502 characters)" in message
        assert len(message) < 300


class TestLoadRequests:
    def test_an_unknown_device_is_rejected_by_name(self, client: TestClient) -> None:
        message = rejected(client.post("/load-model", json={"model_id": "abc", "device": "tpu"}))

        assert message.startswith("device:")
        assert "'tpu'" in message

    def test_the_device_is_normalized(self, client: TestClient) -> None:
        assert downstream_body(client.post("/load-model", json={"device": " CUDA:1 "}))["device"] == "cuda:1"

    def test_query_parameters_become_the_body(self, client: TestClient) -> None:
        response = client.post("/load-model?model_id=abc&device=cpu")

        assert downstream_body(response) == {"model_id": "abc", "device": "cpu"}
        assert response.json()["query"] == ""

    def test_the_body_wins_over_query_parameters(self, client: TestClient) -> None:
        response = client.post("/load-model?model_id=abc&device=cpu", json={"model_id": "xyz"})

        assert downstream_body(response) == {"model_id": "xyz", "device": "cpu"}

    def test_query_parameters_are_validated_like_the_body(self, client: TestClient) -> None:
        assert rejected(client.post("/load-model?device=tpu")).startswith("device:")

    def test_an_unknown_query_parameter_is_rejected_by_name(self, client: TestClient) -> None:
        assert rejected(client.post("/unload-model?force=1")) == "force: unknown field"

    def test_an_unload_without_a_body_means_the_default_model(self, client: TestClient) -> None:
        assert downstream_body(client.post("/unload-model")) == {"model_id": None}


class TestPassThrough:
    def test_get_requests_pass_through_untouched(self, client: TestClient) -> None:
        echoed = client.get("/load-model?device=tpu&whatever=1").json()

        assert echoed["method"] == "GET"
        assert echoed["query"] == "device=tpu&whatever=1"

    def test_posts_to_unlisted_paths_pass_through_untouched(self, client: TestClient) -> None:
        echoed = client.post("/optimize-memory?x=1", content=b"not json", headers={"content-type": "text/plain"}).json()

        assert echoed["body"] == "not json"
        assert echoed["query"] == "x=1"
        assert echoed["content_type"] == "text/plain"

    def test_unlisted_paths_are_not_size_limited(self) -> None:
        client = make_client(max_body_bytes=10)

        assert client.post("/health", content=b"x" * 1000).json()["body"] == "x" * 1000
