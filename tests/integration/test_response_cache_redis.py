"""RedisResponseCache against a real redis-server: shared answers, TTL, and never a failed request."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis
from prometheus_client import REGISTRY

from adapters import response_cache
from adapters.response_cache import CountedResponseCache, RedisResponseCache, response_cache_for
from domain import Generation, response_key
from domain.generation import ChatMessage, GenerationParams, Prompt
from settings import Settings
from tests.redis_server import RedisServer

TIMEOUT_S = 0.2
KEY = response_key("smollm2-135m-instruct", Prompt((ChatMessage("user", "hi"),)), GenerationParams(10, 0.0, 30.0))
ANSWER = Generation(
    text="The capital of France is Paris.",
    model_id="smollm2-135m-instruct",
    finish_reason="stop",
    prompt_tokens=30,
    completion_tokens=8,
    generation_time_s=0.41,
    max_new_tokens=10,
    temperature=0.0,
    time_to_first_token_s=0.07,
    cached_prompt_tokens=16,
)


def cache_at(server: RedisServer, ttl_s: float = 60.0) -> RedisResponseCache:
    return RedisResponseCache(server.url, ttl_s=ttl_s, timeout_s=TIMEOUT_S)


async def timed(operation) -> tuple[object, float]:
    started = time.perf_counter()
    result = await operation
    return result, time.perf_counter() - started


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("ai_model_response_cache_total", {"result": result}) or 0.0


def test_an_answer_stored_by_one_worker_is_read_by_another(redis_server: RedisServer) -> None:
    async def scenario() -> Generation | None:
        writer, reader = cache_at(redis_server), cache_at(redis_server)
        await writer.put(KEY, ANSWER)
        found = await reader.get(KEY)
        await writer.close()
        await reader.close()
        return found

    assert asyncio.run(scenario()) == ANSWER


def test_answers_expire_after_the_ttl_and_a_zero_ttl_keeps_them(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        expiring, keeping = cache_at(redis_server, ttl_s=90.0), cache_at(redis_server, ttl_s=0.0)
        await expiring.put(KEY, ANSWER)
        await keeping.put(KEY + ":kept", ANSWER)
        await expiring.close()
        await keeping.close()

    asyncio.run(scenario())

    client = redis.Redis(port=redis_server.port)
    assert 89_000 < client.pttl(KEY) <= 90_000
    assert client.pttl(KEY + ":kept") == -1  # no expiry: Redis' maxmemory LRU drops it when full


def test_an_unreadable_entry_is_a_miss(redis_server: RedisServer) -> None:
    redis.Redis(port=redis_server.port).set(KEY, b'{"text": "half an entry"}')

    async def scenario() -> Generation | None:
        cache = cache_at(redis_server)
        found = await cache.get(KEY)
        await cache.close()
        return found

    assert asyncio.run(scenario()) is None


def test_redis_gone_is_a_miss_logged_once_then_retried_after_a_pause(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(response_cache, "RETRY_AFTER_FAILURE_S", 0.5)
    caplog.set_level(logging.WARNING, logger=response_cache.__name__)

    async def scenario() -> None:
        cache = cache_at(redis_server)
        await cache.put(KEY, ANSWER)
        redis_server.kill()

        for _ in range(5):
            found, took = await timed(cache.get(KEY))
            assert found is None and took < TIMEOUT_S + 0.1
            await cache.put(KEY, ANSWER)  # dropped, not raised
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1 and f"127.0.0.1:{redis_server.port}" in failures[0].getMessage()

        redis_server.restart()  # empty, on the same port
        await asyncio.sleep(0.6)
        await cache.put(KEY, ANSWER)
        assert await cache.get(KEY) == ANSWER
        assert any("answers again" in r.getMessage() for r in caplog.records)
        await cache.close()

    asyncio.run(scenario())


def test_redis_that_hangs_costs_at_most_the_timeout_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(response_cache, "RETRY_AFTER_FAILURE_S", 60.0)

    async def scenario() -> list[float]:
        cache = cache_at(redis_server)
        await cache.put(KEY, ANSWER)  # the connection is open before the server stops answering
        redis_server.pause()
        try:
            times = []
            for _ in range(3):
                found, took = await timed(cache.get(KEY))
                assert found is None
                times.append(took)
            return times
        finally:
            redis_server.resume()
            await cache.close()

    first, *later = asyncio.run(scenario())

    assert TIMEOUT_S * 0.9 <= first < TIMEOUT_S + 0.15
    assert all(took < 0.01 for took in later)  # skipped until RETRY_AFTER_FAILURE_S passes


def test_every_lookup_is_counted_as_a_hit_or_a_miss(redis_server: RedisServer) -> None:
    hits, misses = lookups("hit"), lookups("miss")

    async def scenario() -> None:
        cache = CountedResponseCache(cache_at(redis_server))
        await cache.get(KEY)
        await cache.put(KEY, ANSWER)
        await cache.get(KEY)
        await cache.get(KEY)
        await cache.close()

    asyncio.run(scenario())

    assert lookups("hit") - hits == 2 and lookups("miss") - misses == 1


def test_the_settings_choose_the_cache(redis_server: RedisServer) -> None:
    assert response_cache_for(Settings(response_cache_size=0, redis_url=redis_server.url)) is None
    assert isinstance(response_cache_for(Settings(redis_url=redis_server.url))._cache, RedisResponseCache)
    assert type(response_cache_for(Settings())._cache).__name__ == "LruResponseCache"
