"""/metrics through a real `bentoml serve`: the engine's and the API workers' metrics, merged by
BentoML's multiprocess collector, move with real traffic, and labels stay bounded."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from .server import Samples, scrape, value

DEFAULT_MODEL = "smollm2-135m-instruct"
UNKNOWN_MODEL = "no-such-model-for-metrics"
# A query no other test sends: a greedy request another test sent first would come from the response cache.
FRANCE = {"query": f"What is the capital of France? Answer in one sentence. ({uuid.uuid4().hex[:8]})", "temperature": 0}
BAD_REQUESTS = 4  # more than MAX_PROCESSES, so that the 422s spread over the API workers
PER_MODEL_HISTOGRAMS = (
    "ai_model_generation_seconds",
    "ai_model_time_to_first_token_seconds",
    "ai_model_time_per_output_token_seconds",
    "ai_model_queue_wait_seconds",
)

def has(samples: Samples, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) in samples


def increase(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def traffic(url):
    """Scrapes, sends a generation, a stream and 4xx answers, then scrapes again."""
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("/load-model", json={"model_id": DEFAULT_MODEL}).status_code == 200
        before = scrape(http)
        answered = http.post("/generate", json=FRANCE)
        assert answered.status_code == 200, answered.text
        with http.stream("POST", "/generate/stream", json={**FRANCE, "max_length": 5}) as response:
            assert response.status_code == 200
            events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
        for _ in range(BAD_REQUESTS):
            assert http.post("/generate", json={"query": "hi", "temperature": 2.5}).status_code == 422
        assert http.post("/generate", json={"query": "hi", "model_id": UNKNOWN_MODEL}).status_code == 404
        after = scrape(http)
        yield {
            "before": before,
            "after": after,
            "generations": [answered.json(), events[-1]],
            "health": http.get("/health").json(),
            "system": http.get("/system-info").json(),
            "http": http,
        }


def test_generation_histograms_count_every_generation(traffic):
    before, after = traffic["before"], traffic["after"]
    assert all(generation["completion_tokens"] >= 2 for generation in traffic["generations"])
    for name in PER_MODEL_HISTOGRAMS:
        assert increase(before, after, f"{name}_count", model=DEFAULT_MODEL) >= 2, name
        assert increase(before, after, f"{name}_sum", model=DEFAULT_MODEL) > 0, name
        # Cumulative buckets end in +Inf, which holds every observation.
        everything = value(after, f"{name}_bucket", model=DEFAULT_MODEL, le="+Inf")
        assert everything == value(after, f"{name}_count", model=DEFAULT_MODEL)
    generation_s = increase(before, after, "ai_model_generation_seconds_sum", model=DEFAULT_MODEL)
    answered_s = sum(generation["generation_time_ms"] for generation in traffic["generations"]) / 1000
    assert generation_s == pytest.approx(answered_s, abs=0.01)  # the answers' own generation_time_ms


def test_token_counters_add_up_the_answers_usage(traffic):
    before, after = traffic["before"], traffic["after"]
    generations = traffic["generations"]
    prompt = increase(before, after, "ai_model_prompt_tokens_total", model=DEFAULT_MODEL)
    generated = increase(before, after, "ai_model_generated_tokens_total", model=DEFAULT_MODEL)
    assert prompt >= sum(generation["prompt_tokens"] for generation in generations) > 0
    assert generated >= sum(generation["completion_tokens"] for generation in generations) > 0


def test_batch_steps_are_counted_with_their_sequences(traffic):
    before, after = traffic["before"], traffic["after"]
    steps = increase(before, after, "ai_model_batch_step_sequences_count", model=DEFAULT_MODEL)
    sequences = increase(before, after, "ai_model_batch_step_sequences_sum", model=DEFAULT_MODEL)
    longest = max(generation["completion_tokens"] for generation in traffic["generations"])
    assert steps >= longest  # a step gives each of its sequences one token at most
    assert sequences >= steps


def test_gauges_are_the_engines_values_not_one_per_process(traffic):
    http = traffic["http"]
    samples = scrape(http)
    assert value(samples, "ai_model_loaded_models") == traffic["health"]["loaded_models_count"] >= 1
    assert value(samples, "ai_model_engine_vms_bytes") >= value(samples, "ai_model_engine_rss_bytes") > 100 * 2**20
    deadline = time.monotonic() + 5
    while value(samples, "ai_model_batch_size", model=DEFAULT_MODEL) and time.monotonic() < deadline:
        time.sleep(0.1)  # the scheduler thread may still be between its last step and going idle
        samples = scrape(http)
    assert value(samples, "ai_model_batch_size", model=DEFAULT_MODEL) == 0
    assert value(samples, "ai_model_queue_depth", model=DEFAULT_MODEL) == 0
    ours = [dict(labels) for name, labels in samples if name.startswith("ai_model_")]
    assert not any("pid" in labels for labels in ours)  # merged, not one series per process


def test_gpu_memory_is_reported_per_device_only_where_cuda_exists(traffic):
    devices = {
        dict(labels)["device"]
        for name, labels in traffic["after"]
        if name in ("ai_model_gpu_memory_allocated_bytes", "ai_model_gpu_memory_reserved_bytes")
    }
    cuda_devices = len(traffic["system"]["cuda_devices"])
    assert devices == {f"cuda:{index}" for index in range(cuda_devices)}


def test_model_loads_are_timed(traffic):
    after = traffic["after"]
    assert value(after, "ai_model_load_seconds_count", model=DEFAULT_MODEL) >= 1  # the preload at least
    assert value(after, "ai_model_load_seconds_sum", model=DEFAULT_MODEL) > 0


def test_errors_are_counted_by_type_summed_over_the_api_workers(traffic):
    before, after = traffic["before"], traffic["after"]
    assert increase(before, after, "ai_model_errors_total", error_type="validation_error") == BAD_REQUESTS
    assert increase(before, after, "ai_model_errors_total", error_type="model_not_found") == 1
    assert has(after, "ai_model_errors_total", error_type="generation_timeout")  # every known type, from the start


def test_no_label_takes_a_value_from_the_request(traffic):
    label_values = {label_value for _, labels in traffic["after"] for _, label_value in labels}
    assert UNKNOWN_MODEL not in label_values
    assert DEFAULT_MODEL in label_values


def test_the_response_cache_counter_is_defined_for_hits_and_misses(traffic):
    after = traffic["after"]
    assert has(after, "ai_model_response_cache_total", result="hit")
    assert has(after, "ai_model_response_cache_total", result="miss")
