from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.layers.kernels import cpu_has_avx2_fma, load_kernels
from engine.repository import TransformersModelRepository
from tests.redis_server import RedisServer

from .support import ROOMY, TINY_QWEN_ID, DirectoryCatalog


@pytest.fixture(scope="session")
def kernel():
    """The engine's CPU kernels, built; skipped only where the CPU cannot run them."""
    built = load_kernels()
    if built is None:
        if not cpu_has_avx2_fma():
            pytest.skip("this CPU lacks AVX2 or FMA, so the CPU kernels are never built on it")
        pytest.fail("the CPU kernels did not build on a CPU with AVX2 and FMA (see the logged warning)")
    return built


@pytest.fixture(scope="session")
def executor():
    with ThreadPoolExecutor(4, thread_name_prefix="test-engine") as pool:
        yield pool


@pytest.fixture
def repository(request, tiny_qwen_dir, executor) -> TransformersModelRepository:
    """Unquantized, unless a test parametrizes it indirectly with a QUANTIZATION value."""
    quantization = getattr(request, "param", "none")
    catalog = DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir})
    repository = TransformersModelRepository(catalog, executor, ROOMY, quantization_setting=quantization)
    yield repository
    # Whatever a test left loaded, failing tests included: a loaded model's scheduler thread keeps its
    # weights and KV cache alive, and later tests' memory guards would count them.
    for model in asyncio.run(repository.list_models()):
        if model.is_loaded:
            repository.unload_blocking(model.id)


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A real, empty redis-server on a free loopback port, killed after the test."""
    server = RedisServer.start(tmp_path)
    yield server
    server.kill()
