"""Every endpoint of the specification through a real `bentoml serve`, called with httpx."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"
FRANCE = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0}


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture
def default_model_loaded(http):
    assert http.post("/load-model", json={"model_id": DEFAULT_MODEL}).status_code == 200


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "error_type"}
    assert body["error_type"] == error_type
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body


def test_the_specs_curl_example_answers_with_a_generated_result(http):
    # curl -X POST http://localhost:8003/generate -d '{"query": "тест", ...}' sends a form content type.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    response = http.post("/generate", content=json.dumps({"query": "тест"}), headers=form)
    assert response.status_code == 200, response.text
    assert response.json()["result"].strip()
    # With the production model id and no Qwen imported: 404 that says how to import it.
    response = http.post("/generate", content=json.dumps({"query": "тест", "model_id": "qwen-model_full"}), headers=form)
    assert_error(response, 404, "model_not_found", "qwen-model_full", DEFAULT_MODEL, "scripts/import_model.py")


def test_generate_answers_the_france_question(http):
    response = http.post("/generate", json={**FRANCE, "context": ["France is a country in Europe."]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["result"]
    assert body["model_id"] == DEFAULT_MODEL
    assert body["finish_reason"] in ("stop", "length")
    assert body["total_tokens"] == body["prompt_tokens"] + body["completion_tokens"]
    assert 0 < body["completion_tokens"] <= body["max_new_tokens"] == 10  # MAX_NEW_TOKENS caps the default 512
    assert body["generation_time_ms"] > 0 and body["total_time_ms"] >= body["generation_time_ms"]


def test_min_tokens_and_ignore_eos_make_the_answer_exactly_max_length_tokens(http):
    for exactly in ({"min_tokens": 10}, {"ignore_eos": True}):
        body = http.post("/generate", json={**FRANCE, "temperature": 0, "max_length": 10, **exactly}).json()
        assert body["completion_tokens"] == 10 and body["finish_reason"] == "length", (exactly, body)


def test_max_length_above_max_new_tokens_is_capped(http):
    body = http.post("/generate", json={**FRANCE, "max_length": 2048}).json()
    assert body["max_new_tokens"] == 10 and body["completion_tokens"] <= 10


def test_health_reports_status_service_models_and_memory(http, default_model_loaded):
    body = http.get("/health").json()
    assert body["status"] == "healthy" and body["service"] == "ai-model"
    assert body["loaded_models_count"] >= 1
    assert DEFAULT_MODEL in [model["id"] for model in body["loaded_models"]]
    assert body["memory_usage"]["rss_mb"] > 100


def test_system_info_reports_cpus_memory_workers_and_models(http, default_model_loaded):
    body = http.get("/system-info").json()
    assert body["cpu_count"] >= 1
    assert body["memory"]["rss_mb"] > 0 and body["memory"]["system_total_mb"] > 0
    assert body["max_workers"] == 8 and body["max_processes"] == 2
    assert body["engine_threads"] >= 1 and body["torch_threads"] == min(4, len(os.sched_getaffinity(0)))
    assert body["loaded_models_count"] >= 1


def test_memory_usage_reports_rss_vms_percent_and_models(http, default_model_loaded):
    body = http.get("/memory-usage").json()
    assert body["rss_mb"] > 100 and body["vms_mb"] >= body["rss_mb"]
    assert 0 < body["percent"] < 100
    assert body["loaded_models_count"] >= 1
    model = next(model for model in body["loaded_models"] if model["id"] == DEFAULT_MODEL)
    assert model["device"] == "cpu" and model["memory_mb"] > 400 and model["kv_cache_mb"] > 0
    assert model["last_used_at"] and model["idle_unload_at"] is None  # MODEL_IDLE_TIMEOUT=0: never


def test_models_lists_the_store(http):
    body = http.get("/models").json()
    assert body["default_model_id"] == DEFAULT_MODEL
    model = next(model for model in body["models"] if model["id"] == DEFAULT_MODEL)
    assert model["metadata"]["architecture"] == "LlamaForCausalLM"
    assert model["metadata"]["context_length"] == 8192


def test_models_shows_which_kernel_serves_each_linear_shape_at_each_row_count(http, default_model_loaded, service):
    model = next(model for model in http.get("/models").json()["models"] if model["id"] == DEFAULT_MODEL)
    kernels = model["metadata"]["linear_kernels"]
    # SmolLM2-135M, its decoder fused: q|k|v, o, gate|up, down, and the lm_head tied to the embeddings.
    assert set(kernels["plans"]) == {"960x576", "576x576", "3072x576", "576x1536", "49152x576"}
    for plan in kernels["plans"].values():
        assert set(plan) == {"1", "2-8", "9-24", "25-48", "49-128", "129+"}
        assert set(plan.values()) <= {"mkl", "onednn", "transposed", "small_rows", "avx512_packed"}
    assert kernels["layers"] == 30 * 4 + 1 and kernels["tuning_s"] >= 0 and kernels["copies_mb"] >= 0
    # and the engine's log says what the load did, and how long the plans took
    tuned = rf"{DEFAULT_MODEL}: 121 linear layers of 5 shapes on their kernels, (timed|plans from the cache) in"
    assert re.search(tuned, service.logs())
    assert re.search(rf"loaded {DEFAULT_MODEL} in .*30 decoder layers fused", service.logs())


def test_probes_answer(http):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_without_api_keys_the_routes_are_open_and_the_server_says_so_once(http, service):
    """Once for the server, not once per worker: MAX_PROCESSES is 2 here."""
    assert http.get("/health").status_code == 200 and http.get("/docs.json").status_code == 200
    assert service.logs().count("neither API_KEYS nor API_KEYS_FILE is set: every route is open") == 1


def test_load_unload_and_reload_by_body_and_by_query(http):
    loaded = http.post("/load-model", json={"model_id": DEFAULT_MODEL, "device": "cpu"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model"] | {"is_loaded": True, "device": "cpu"} == loaded.json()["model"]

    unloaded = http.post("/unload-model", params={"model_id": DEFAULT_MODEL})
    assert unloaded.status_code == 200 and unloaded.json()["model"]["is_loaded"] is False
    assert http.get("/health").json()["status"] == "degraded"

    again = http.post("/load-model", params={"model_id": DEFAULT_MODEL, "device": "auto"})
    assert again.status_code == 200 and again.json()["model"]["is_loaded"] is True
    assert "Paris" in http.post("/generate", json=FRANCE).json()["result"]


def test_generate_loads_an_unloaded_model_on_demand(http):
    assert http.post("/unload-model", json={"model_id": DEFAULT_MODEL}).status_code == 200
    # A max_length no other test sends: an answer in the response cache would need no model.
    response = http.post("/generate", json={**FRANCE, "max_length": 8})
    assert response.status_code == 200 and "Paris" in response.json()["result"]
    assert http.get("/health").json()["default_model_loaded"] is True


def test_optimize_memory_needs_no_body(http):
    response = http.post("/optimize-memory")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "optimized"
    assert body["rss_after_mb"] > 0 and body["freed_mb"] >= 0


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({}, ["query", "required"]),
        ({"query": ""}, ["query", "at least 1 character"]),
        ({"query": 42}, ["query", "valid string", "42"]),
        ({"query": "hi", "max_length": 5000}, ["max_length", "2048", "5000"]),
        ({"query": "hi", "max_length": 0}, ["max_length", "1", "0"]),
        ({"query": "hi", "max_length": True}, ["max_length", "integer", "True"]),
        ({"query": "hi", "max_length": "5"}, ["max_length", "integer", "'5'"]),
        ({"query": "hi", "temperature": 2.5}, ["temperature", "2", "2.5"]),
        ({"query": "hi", "temperature": -1}, ["temperature", "0", "-1"]),
        ({"query": "hi", "context": "not a list"}, ["context", "list"]),
        ({"query": "hi", "context": [1, 2]}, ["context.0", "string"]),
        ({"query": "hi", "use_async": "maybe"}, ["use_async", "boolean", "maybe"]),
        ({"query": "hi", "model_id": "../etc/passwd"}, ["model_id", "pattern"]),
        ({"query": "hi", "prompt": "unknown"}, ["prompt", "unknown field"]),
        ({"query": "a\u0000b"}, ["query", "NUL"]),
        ({"query": "hi", "timeout": 0}, ["timeout", "0.01", "0"]),
        ({"query": "hi", "timeout": 31}, ["timeout", "30", "31"]),
        ({"query": "hi", "min_tokens": -1}, ["min_tokens", "0", "-1"]),
        ({"query": "hi", "min_tokens": 1.5}, ["min_tokens", "integer", "1.5"]),
        ({"query": "hi", "max_length": 3, "min_tokens": 4}, ["min_tokens", "max_length", "3", "4"]),
        ({"query": "hi", "ignore_eos": "yes"}, ["ignore_eos", "boolean", "yes"]),
    ],
)
def test_invalid_generate_bodies_answer_422_naming_the_field(http, body, fragments):
    assert_error(http.post("/generate", json=body), 422, "validation_error", *fragments)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"{not json", "must be JSON"), (b"[1, 2]", "JSON object"), (b'{"query": "\xff\xfe"}', "UTF-8")],
)
def test_malformed_bodies_answer_422(http, content, fragment):
    response = http.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "validation_error", fragment)


def test_oversized_body_answers_413(http):
    huge = json.dumps({"query": "x" * 9_000_000})
    assert_error(http.post("/generate", content=huge), 413, "payload_too_large", "bytes")


def test_query_longer_than_the_limit_answers_422(http):
    assert_error(http.post("/generate", json={"query": "x" * 32_001}), 422, "validation_error", "query", "32000")


def test_prompt_past_the_context_window_answers_422(http):
    words = {"query": "word " * 6000, "context": ["more words " * 1500]}
    assert_error(http.post("/generate", json=words), 422, "validation_error", "context window of 8192 tokens")


def test_unknown_models_answer_404_on_every_route(http):
    assert_error(http.post("/load-model", json={"model_id": "no-such-model"}), 404, "model_not_found", "no-such-model")
    assert_error(http.post("/unload-model", params={"model_id": "no-such-model"}), 404, "model_not_found")
    assert_error(http.post("/generate", json={"query": "hi", "model_id": "no-such-model"}), 404, "model_not_found")


def test_absent_device_answers_503_and_impossible_device_422(http):
    body = {"model_id": DEFAULT_MODEL, "device": "cuda:99"}
    assert_error(http.post("/load-model", json=body), 503, "device_not_available", "cuda:99", "cpu")
    assert_error(http.post("/load-model", json={"device": "tpu"}), 422, "validation_error", "device", "tpu")


def test_the_service_keeps_serving_after_bad_input(http):
    for bad in ({"query": 1}, {"query": "hi", "max_length": -3}, {"nope": True}):
        assert http.post("/generate", json=bad).status_code == 422
    assert "Paris" in http.post("/generate", json=FRANCE).json()["result"]


def test_a_request_past_its_own_timeout_answers_504_naming_that_timeout_and_not_the_servers(http):
    sampled = {**FRANCE, "temperature": 0.7}  # not served from the response cache
    response = http.post("/generate", json={**sampled, "timeout": 0.01})
    assert response.status_code == 504, response.text
    assert "the request's timeout of 0.01s" in response.json()["error"]
    assert "MAX_GENERATION_TIME" not in response.json()["error"]
    assert http.post("/generate", json=FRANCE).status_code == 200
