"""The shared response cache: two `bentoml serve` instances with one REDIS_URL, a real redis-server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from domain.response_cache import KEY_PREFIX
from tests.redis_server import RedisServer

from .server import RunningService, launch, wait_ready

LONG_ENOUGH = {"query": "Write a short poem about the sea.", "max_length": 48, "temperature": 0}
FAILURE_LOG = "generating without the response cache"


@pytest.fixture(scope="module")
def instances(cache_redis, tmp_path_factory) -> tuple[RunningService, RunningService]:
    """Two instances, as two pods would be: each its own API worker, engine and BentoML home (so its
    own /metrics), one model store, one Redis."""
    env = {"REDIS_URL": cache_redis.url, "MAX_PROCESSES": "1", "MAX_NEW_TOKENS": "64", "KV_CACHE_MB": "64"}
    started = []
    for name in "ab":
        home = tmp_path_factory.mktemp(f"instance-{name}")
        (home / "models").symlink_to(Path(os.environ["BENTOML_HOME"], "models"))
        started.append(launch(home / "serve.log", {**env, "BENTOML_HOME": str(home)}))
    try:
        for service in started:
            wait_ready(service)
        yield started[0], started[1]
    finally:
        for service in started:
            service.stop()


def generate(service: RunningService, body: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    response = httpx.post(f"{service.url}/generate", json=body, timeout=120)
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return response.json(), took


def cache_keys(server: RedisServer) -> list[bytes]:
    return redis.Redis(port=server.port).keys(f"{KEY_PREFIX}*")


def cache_lookups(service: RunningService) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ai_model_response_cache_total"
    }


def test_an_answer_generated_by_one_instance_is_served_by_the_other_from_the_cache(instances, cache_redis) -> None:
    first_instance, second_instance = instances

    generated, generating_took = generate(first_instance, LONG_ENOUGH)
    served, serving_took = generate(second_instance, LONG_ENOUGH)

    assert not generated["cached"] and generated["completion_tokens"] > 10 and generated["generation_time_ms"] > 0
    assert served["cached"] and served["generation_time_ms"] == 0
    assert served["result"] == generated["result"]
    assert served["completion_tokens"] == generated["completion_tokens"]
    assert serving_took * 5 < generating_took, (serving_took, generating_took)
    assert len(cache_keys(cache_redis)) == 1
    assert cache_lookups(second_instance) == {"hit": 1.0, "miss": 0.0}  # both series exist from the start
    assert cache_lookups(first_instance) == {"hit": 0.0, "miss": 1.0}

    again, _ = generate(first_instance, LONG_ENOUGH)
    assert again["cached"] and again["result"] == generated["result"]


def test_a_cached_answer_streams_as_one_piece_of_text(instances) -> None:
    first_instance, second_instance = instances
    body = {"query": "What is the capital of France?", "temperature": 0}
    generated, _ = generate(first_instance, body)

    with httpx.stream("POST", f"{second_instance.url}/generate/stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line]

    assert events[0] == {"text": generated["result"]}
    assert events[1]["done"] and events[1]["cached"] and events[1]["result"] == generated["result"]
    assert len(events) == 2
    assert "Paris" in generated["result"]


def test_a_request_with_a_temperature_is_not_cached(instances, cache_redis) -> None:
    first_instance, second_instance = instances
    keys_before = len(cache_keys(cache_redis))
    body = {"query": "Write a short poem about the sea.", "max_length": 12, "temperature": 0.8}

    answers = [generate(service, body)[0] for service in (first_instance, second_instance, first_instance)]

    assert not any(answer["cached"] for answer in answers)
    assert all(answer["generation_time_ms"] > 0 for answer in answers)
    assert len(cache_keys(cache_redis)) == keys_before


def test_with_redis_hung_then_gone_every_request_is_still_answered(instances, cache_redis) -> None:
    """Runs last: it stops the module's Redis."""
    first_instance, second_instance = instances
    body = {"query": "Name three colours.", "max_length": 8, "temperature": 0}

    cache_redis.pause()  # connections stay open and nothing answers: a slow Redis
    hung, _ = generate(first_instance, body)
    cache_redis.kill()  # then gone: connections are refused
    gone = [generate(service, body)[0] for service in (second_instance, first_instance, second_instance)]

    assert not hung["cached"]
    # REDIS_TIMEOUT (0.2 s) is all a hung Redis may add to the request beyond its generation.
    assert hung["total_time_ms"] - hung["generation_time_ms"] < 1500, hung
    assert not any(answer["cached"] for answer in gone)
    assert len({answer["result"] for answer in [hung, *gone]}) == 1
    for service in instances:
        assert service.logs().count(FAILURE_LOG) == 1, service.logs()[-3000:]
    assert httpx.get(f"{first_instance.url}/readyz", timeout=10).status_code == 200
