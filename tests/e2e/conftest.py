from __future__ import annotations

import pytest

from tests.redis_server import RedisServer

from .server import RunningService, start


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> RunningService:
    """The service as `make serve` runs it: default settings, the bundled model preloaded."""
    running = start(tmp_path_factory.mktemp("serve") / "serve.log")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def url(service) -> str:
    return service.url


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory) -> RedisServer:
    """A real redis-server for one test module's services."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()
