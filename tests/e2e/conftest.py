from __future__ import annotations

import pytest

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
