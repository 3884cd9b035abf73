from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from runners.repository import TransformersModelRepository
from tests.redis_server import RedisServer

from .support import ROOMY, TINY_QWEN_ID, DirectoryCatalog


@pytest.fixture(scope="session")
def executor():
    with ThreadPoolExecutor(4, thread_name_prefix="test-engine") as pool:
        yield pool


@pytest.fixture
def repository(request, tiny_qwen_dir, executor) -> TransformersModelRepository:
    """Unquantized, unless a test parametrizes it indirectly with a QUANTIZATION value."""
    quantization = getattr(request, "param", "none")
    catalog = DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir})
    return TransformersModelRepository(catalog, executor, ROOMY, quantization_setting=quantization)


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A real, empty redis-server on a free loopback port, killed after the test."""
    server = RedisServer.start(tmp_path)
    yield server
    server.kill()
