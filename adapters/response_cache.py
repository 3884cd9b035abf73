"""The response cache's adapters: Redis, shared by every worker and instance, and the lookup counter.

Redis that is down or slow never fails a request. A call that errs or takes longer than
REDIS_TIMEOUT reads as a miss (a store is dropped), the outage is logged once, and Redis is left
alone for RETRY_AFTER_FAILURE_S, so an outage costs one timeout per worker per period rather than
one per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from domain import Generation, LruResponseCache, ResponseCache
from metrics import count_cache_lookup
from settings import Settings

logger = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 2.0


class RedisResponseCache(ResponseCache):
    def __init__(
        self, url: str, ttl_s: float, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # No retries: a second try would double the time a request waits on a Redis that is gone.
        self._redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._ttl_ms = round(ttl_s * 1000) or None
        self._timeout_s = timeout_s
        self._clock = clock
        address = urlparse(url)
        self._address = address.netloc.rpartition("@")[2] or address.path  # never the password
        self._failing = False
        self._skip_until = 0.0

    async def get(self, key: str) -> Generation | None:
        stored = await self._call(lambda: self._redis.get(key))
        if stored is None:
            return None
        try:
            return Generation.from_dict(json.loads(stored))
        except (ValueError, TypeError) as error:
            logger.warning("response cache entry %s is unreadable, generating instead: %s", key, error)
            return None

    async def put(self, key: str, generation: Generation) -> None:
        await self._call(lambda: self._redis.set(key, json.dumps(generation.to_dict()), px=self._ttl_ms))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        if self._clock() < self._skip_until:
            return None
        try:  # the socket timeouts bound each read and the connect; this bounds the whole call
            async with asyncio.timeout(self._timeout_s):
                result = await command()
        except (RedisError, OSError, TimeoutError) as error:
            if not self._failing:
                logger.warning(
                    "Redis at %s failed (%s: %s); generating without the response cache, trying it again every %gs",
                    self._address, type(error).__name__, error, RETRY_AFTER_FAILURE_S,
                )
            self._failing = True
            self._skip_until = self._clock() + RETRY_AFTER_FAILURE_S
            return None
        if self._failing:
            logger.warning("Redis at %s answers again; the response cache is back", self._address)
            self._failing = False
        return result


class CountedResponseCache(ResponseCache):
    """Counts every lookup as a hit or a miss in ai_model_response_cache_total."""

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    async def get(self, key: str) -> Generation | None:
        generation = await self._cache.get(key)
        count_cache_lookup(hit=generation is not None)
        return generation

    async def put(self, key: str, generation: Generation) -> None:
        await self._cache.put(key, generation)

    async def close(self) -> None:
        await self._cache.close()


def response_cache_for(settings: Settings) -> ResponseCache | None:
    """Redis when REDIS_URL is set, otherwise this worker's own LRU; None when RESPONSE_CACHE_SIZE is 0."""
    if settings.response_cache_size == 0:
        return None
    if settings.redis_url:
        cache = RedisResponseCache(settings.redis_url, settings.response_cache_ttl, settings.redis_timeout)
    else:
        cache = LruResponseCache(settings.response_cache_size, settings.response_cache_ttl)
    return CountedResponseCache(cache)
