"""A load refused for memory makes room by unloading idle models, with the real memory check: once
the first model is in, MIN_MEMORY_GB is set from this machine's free memory so that the second
model fits only once the first is gone."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest

from domain import GenerationParams, InsufficientMemoryError, PromptBuilder
from engine.models.loader import AUTO_KV_CACHE_MAX, STEP_ACTIVATIONS, BatchingOptions
from engine.models.memory import GIB, system_memory
from engine.repository import TransformersModelRepository
from metrics import EVICTIONS

from .support import BUNDLED_MODEL_ID, TINY_QWEN_ID, DirectoryCatalog

SMALL_CACHE = BatchingOptions(kv_cache_bytes=64 * 2**20)
# Less than a loaded SmolLM2 gives back when unloaded, more than memory moves on its own meanwhile.
MARGIN_BYTES = 100 * 2**20


@dataclass
class Limits:
    """MemoryLimits' fields, settable: the test tightens them once the first model is in."""

    max_usage_fraction: float = 0.99
    min_free_gb: float = 0.0
    gpu_memory_fraction: float = 0.8


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def tight(tiny_qwen_dir, executor, limits):
    catalog = DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir})
    repository = TransformersModelRepository(catalog, executor, limits, batching=SMALL_CACHE)
    yield repository
    for model_id in (BUNDLED_MODEL_ID, TINY_QWEN_ID):
        repository.unload_blocking(model_id)


def leave_no_room_for_the_qwen(repository: TransformersModelRepository, limits: Limits) -> None:
    """MIN_MEMORY_GB just past what loading the tiny Qwen2 would leave free now."""
    qwen = repository._loader.footprint(repository._catalog.get(TINY_QWEN_ID), "cpu")
    limits.min_free_gb = (system_memory().available - qwen + MARGIN_BYTES) / GIB


def evictions() -> float:
    return EVICTIONS.labels(reason="make_room")._value.get()


def test_a_load_refused_for_memory_unloads_an_idle_model_and_loads(tight, limits, caplog):
    run(tight.load_model(BUNDLED_MODEL_ID, "cpu"))
    leave_no_room_for_the_qwen(tight, limits)
    before = evictions()

    with caplog.at_level(logging.WARNING, logger="engine.repository"):
        loaded = run(tight.load_model(TINY_QWEN_ID, "cpu"))

    assert loaded.is_loaded and tight.loaded(BUNDLED_MODEL_ID) is None
    assert evictions() == before + 1
    assert f"unloaded idle model {BUNDLED_MODEL_ID}: {TINY_QWEN_ID}" in caplog.text


def test_a_model_with_a_request_in_flight_is_never_unloaded_for_room(tight, limits):
    run(tight.load_model(BUNDLED_MODEL_ID, "cpu"))
    leave_no_room_for_the_qwen(tight, limits)
    story = PromptBuilder().build("Tell a long story about a dragon.", [])
    long_answer = GenerationParams(max_new_tokens=40, temperature=0.0, timeout_s=120, min_new_tokens=40)

    async def load_while_generating() -> Exception:
        async for item in tight.stream_text(BUNDLED_MODEL_ID, story, long_answer):
            if isinstance(item, str):  # the generation is in flight
                try:
                    await tight.load_model(TINY_QWEN_ID, "cpu")
                except InsufficientMemoryError as refused:
                    return refused
        raise AssertionError("the load was not refused")

    refused = run(load_while_generating())

    assert "no idle model could be unloaded to make room" in str(refused)
    assert tight.loaded(BUNDLED_MODEL_ID) is not None and tight.loaded(TINY_QWEN_ID) is None


@pytest.fixture
def auto_kv(tiny_qwen_dir, executor, limits):
    """KV_CACHE_MB unset: each load sizes its cache from the memory left."""
    repository = TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, limits)
    yield repository
    repository.unload_blocking(TINY_QWEN_ID)


def test_unset_kv_cache_mb_takes_its_most_where_memory_is_plentiful(auto_kv):
    loaded = run(auto_kv.load_model(TINY_QWEN_ID, "cpu"))
    cache = auto_kv.loaded(TINY_QWEN_ID).cache
    assert loaded.is_loaded and AUTO_KV_CACHE_MAX - cache.size_bytes < 2**20  # whole blocks of it


def test_unset_kv_cache_mb_takes_what_min_memory_gb_leaves(auto_kv, limits):
    # 500 MB beyond a step's activations: the load itself takes some of it (the tiny weights, the
    # kernels' plans, the process's own allocations: about 100 MB), the KV cache the rest.
    limits.min_free_gb = (system_memory().available - STEP_ACTIVATIONS - 500 * 2**20) / GIB
    run(auto_kv.load_model(TINY_QWEN_ID, "cpu"))
    kv_cache_mb = auto_kv.loaded(TINY_QWEN_ID).cache.size_bytes / 2**20
    assert 250 < kv_cache_mb < 500, kv_cache_mb


def test_a_load_that_leaves_no_room_for_a_kv_cache_fails_naming_the_limits(auto_kv, limits):
    limits.min_free_gb = (system_memory().available - STEP_ACTIVATIONS - 2**20) / GIB
    with pytest.raises(InsufficientMemoryError, match=r"for a KV cache within MAX_MEMORY_USAGE and MIN_MEMORY_GB"):
        run(auto_kv.load_model(TINY_QWEN_ID, "cpu"))
    assert auto_kv.loaded(TINY_QWEN_ID) is None
