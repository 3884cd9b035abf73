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
def repository(tiny_qwen_dir, executor) -> TransformersModelRepository:
    return TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, ROOMY)


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A real, empty redis-server on a free loopback port, killed after the test."""
    server = RedisServer.start(tmp_path)
    yield server
    server.kill()
