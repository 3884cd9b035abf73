"""API keys and CORS through one real `bentoml serve` with API_KEYS, API_KEYS_FILE, METRICS_REQUIRE_API_KEY and
CORS_ORIGINS set. Every route its own /docs.json lists is walked, so a new route cannot be left unguarded:
without a key or with a wrong one, 401 in the route's error shape; with a right one, its answer. The probes
and (as set here) /metrics stay open; the `openai` package and bentoml.SyncHTTPClient work with a key;
browsers get CORS headers on preflights and answers, a 401 included; no key shows in the log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import bentoml
import httpx
import openai
import pytest
from bentoml.exceptions import BentoMLException

from .server import RunningService, start

KEY = "e2e-env-key-5f1c0a9d"
FILE_KEY = "e2e-file-key-83b2e4d7"
WRONG_KEY = "e2e-wrong-key-00000000"
ORIGIN = "https://moderation.example.com"
OTHER_ORIGIN = "https://elsewhere.example.com"
MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# The probes always; /metrics because METRICS_REQUIRE_API_KEY=false below.
OPEN_ROUTES = {"/livez", "/readyz", "/healthz", "/metrics"}
# Served but not in /docs.json: the document itself, BentoML's client schema, the Swagger UI, an unknown path.
UNDOCUMENTED_ROUTES = ["/docs.json", "/schema.json", "/", "/v1/no-such-route", "/no-such-route"]
GENERATION = {"query": "hi", "max_length": 1}
# The smallest valid body of each POST route in the document; a route added to it without one here fails.
POST_BODIES: dict[str, dict[str, Any] | None] = {
    "/generate": GENERATION,
    "/generate/stream": GENERATION,
    "/generate-task": GENERATION,
    "/generate-task/submit": GENERATION,
    "/generate-task/retry": None,  # its task_id is a query parameter
    "/classify": {"query": "hi", "labels": ["yes", "no"]},
    "/load-model": {"model_id": MODEL},
    "/unload-model": {"model_id": MODEL},  # the next generation loads it again (AUTO_LOAD_MODELS)
    "/optimize-memory": {},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
}
# Small text limits, so a body past them is small too (api/validation.py answers 413 before reading it).
LIMITS = {"MAX_QUERY_CHARS": "100", "MAX_CONTEXT_ITEMS": "1", "MAX_CONTEXT_ITEM_CHARS": "100"}
TASK_FINISH_BOUND_S = 120


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


REFUSED_HEADERS = {"no key": {}, "a wrong key": bearer(WRONG_KEY), "another scheme": {"Authorization": f"Basic {KEY}"}}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[RunningService]:
    directory = tmp_path_factory.mktemp("api-keys")
    keys_file = directory / "api-keys"
    keys_file.write_text(f"# the dashboard's key\n\n{FILE_KEY}\n")
    env = {
        "API_KEYS": KEY,
        "API_KEYS_FILE": str(keys_file),
        "METRICS_REQUIRE_API_KEY": "false",
        "CORS_ORIGINS": ORIGIN,
        "MAX_PROCESSES": "1",
        **LIMITS,
    }
    running = start(directory / "serve.log", env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(guarded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def document(http) -> dict[str, Any]:
    response = http.get("/docs.json", headers=bearer(KEY))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def task_id(http) -> str:
    """A task that ran to its answer: /generate-task/status, /get and /retry need one."""
    submitted = http.post("/generate-task/submit", json=GENERATION, headers=bearer(KEY))
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + TASK_FINISH_BOUND_S
    while http.get("/generate-task/status", params={"task_id": task_id}, headers=bearer(KEY)).json()["status"] == "in_progress":
        assert time.monotonic() < deadline, f"the task did not finish in {TASK_FINISH_BOUND_S}s"
        time.sleep(0.2)
    return task_id


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method.upper(), operation) for path, item in document["paths"].items() for method, operation in item.items()]


def call(http: httpx.Client, path: str, method: str, operation: dict[str, Any], task_id: str, headers: dict[str, str]) -> httpx.Response:
    """The operation with real parameter values (a parameter of a new name fails here) and its smallest body."""
    values = {"model_id": MODEL, "task_id": task_id}
    parameters = {place: {} for place in ("path", "query")}
    for parameter in operation.get("parameters", []):
        parameters[parameter["in"]][parameter["name"]] = values[parameter["name"]]
    body = POST_BODIES[path] if method == "POST" else None
    return http.request(method, path.format(**parameters["path"]), params=parameters["query"], json=body, headers=headers)


def assert_unauthorized(response: httpx.Response, path: str) -> None:
    assert response.status_code == 401, f"{path}: {response.status_code} {response.text}"
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    if path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "unauthorized", body
    else:
        assert set(body) == {"error", "error_type"} and body["error_type"] == "unauthorized", body


def test_the_document_lists_the_open_routes_and_declares_the_key_on_every_other(document):
    listed = operations(document)

    assert OPEN_ROUTES <= {path for path, _, _ in listed}
    assert set(POST_BODIES) == {path for path, method, _ in listed if method == "POST"}
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "one of API_KEYS or API_KEYS_FILE's keys"
    }
    for path, _, operation in listed:
        if path in OPEN_ROUTES:
            assert "security" not in operation and "401" not in operation["responses"], path
        else:
            assert operation["security"] == [{"apiKey": []}] and "401" in operation["responses"], path


@pytest.mark.parametrize("refused", REFUSED_HEADERS)
def test_every_route_but_the_open_ones_refuses_a_request_without_a_right_key(http, document, task_id, refused):
    guarded_operations = [(path, method, operation) for path, method, operation in operations(document) if path not in OPEN_ROUTES]
    # Every family of routes is walked: BentoML's APIs and tasks, the mounted GET routes and /v1.
    assert {"/generate", "/generate-task/status", "/health", "/v1/chat/completions"} <= {path for path, _, _ in guarded_operations}

    for path, method, operation in guarded_operations:
        assert_unauthorized(call(http, path, method, operation, task_id, REFUSED_HEADERS[refused]), path)
    for path in UNDOCUMENTED_ROUTES:
        assert_unauthorized(http.get(path, headers=REFUSED_HEADERS[refused]), path)


def test_with_a_right_key_every_route_answers(http, document, task_id):
    for number, (path, method, operation) in enumerate(operations(document)):
        key = (KEY, FILE_KEY)[number % 2]  # API_KEYS' key and API_KEYS_FILE's alike
        response = call(http, path, method, operation, task_id, bearer(key))
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
    for path in ("/docs.json", "/schema.json", "/"):
        assert http.get(path, headers=bearer(FILE_KEY)).status_code == 200, path


def test_the_probes_and_metrics_need_no_key(http):
    for path in OPEN_ROUTES:
        assert http.get(path).status_code == 200, path
    assert "bentoml_service_request_total" in http.get("/metrics").text


def test_a_request_without_a_key_is_refused_before_its_body_is_read(http):
    oversized = {"query": "x" * 100, "context": ["x" * 100_000]}  # past the limits: 413 for a client with a key

    assert http.post("/generate", json=oversized, headers=bearer(KEY)).status_code == 413
    assert_unauthorized(http.post("/generate", json=oversized), "/generate")


def test_the_openai_client_works_with_a_key_and_is_refused_with_a_wrong_one(guarded):
    with openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        answer = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
        assert answer.choices[0].message.content == "The capital of France is Paris."
        assert MODEL in [model.id for model in client.models.list()]
    with openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=WRONG_KEY, max_retries=0, timeout=120) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model=MODEL, messages=FRANCE)
    assert refused.value.status_code == 401 and refused.value.code == "unauthorized"
    assert WRONG_KEY not in refused.value.message


def test_the_bentoml_client_works_with_its_token_and_fails_without(guarded):
    with bentoml.SyncHTTPClient(guarded.url, token=FILE_KEY, timeout=120) as client:
        assert client.generate(query=FRANCE[0]["content"], temperature=0)["result"] == "The capital of France is Paris."
        assert client.client.get("/health").json()["status"] == "healthy"  # its session carries the token
    for token in (None, WRONG_KEY):
        with pytest.raises(BentoMLException):
            with bentoml.SyncHTTPClient(guarded.url, token=token, timeout=120) as client:
                client.generate(query=FRANCE[0]["content"])


def test_a_browser_preflight_needs_no_key_and_an_allowed_origin_gets_cors_headers(http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}

    allowed = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    other = http.options("/v1/chat/completions", headers={"Origin": OTHER_ORIGIN, **preflight})

    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_answers_to_an_allowed_origin_carry_cors_headers_a_401_too(http):
    served = http.get("/health", headers={"Origin": ORIGIN, **bearer(KEY)})
    refused = http.get("/health", headers={"Origin": ORIGIN})
    elsewhere = http.get("/health", headers={"Origin": OTHER_ORIGIN, **bearer(KEY)})

    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ORIGIN
    assert served.headers["access-control-expose-headers"] == "Retry-After"
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert elsewhere.status_code == 200 and "access-control-allow-origin" not in elsewhere.headers


def test_no_key_shows_in_system_info_or_the_log(http, guarded):
    """Last: after every refusal and answer above."""
    info = http.get("/system-info", headers=bearer(KEY))

    assert info.status_code == 200
    for key in (KEY, FILE_KEY, WRONG_KEY):
        assert key not in info.text and key not in guarded.logs(), key
    assert "neither API_KEYS nor API_KEYS_FILE is set" not in guarded.logs()
