"""BentoML's own Python clients against the real server."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import bentoml
import pytest
from bentoml.exceptions import BentoMLException

DEFAULT_MODEL = "smollm2-135m-instruct"
FRANCE = "What is the capital of France? Answer in one sentence."


@pytest.fixture
def client(url):
    with bentoml.SyncHTTPClient(url, timeout=120) as client:
        yield client


def test_sync_client_generates(client):
    answer = client.generate(query=FRANCE, context=["France is in Europe."], temperature=0)
    assert "Paris" in answer["result"]
    assert answer["model_id"] == DEFAULT_MODEL


def test_sync_client_manages_models(client):
    assert client.load_model(model_id=DEFAULT_MODEL, device="cpu")["model"]["is_loaded"] is True
    assert client.unload_model(model_id=DEFAULT_MODEL)["model"]["is_loaded"] is False
    assert client.load_model(model_id=DEFAULT_MODEL)["model"]["device"] == "cpu"
    assert client.optimize_memory()["status"] == "optimized"


def test_sync_client_reads_the_get_routes(client):
    assert client.client.get("/health").json()["service"] == "ai-model"
    assert client.client.get("/memory-usage").json()["rss_mb"] > 0
    assert client.client.get("/system-info").json()["cpu_count"] >= 1


def test_sync_client_sees_errors_with_their_status(client):
    with pytest.raises(BentoMLException, match="model_not_found") as not_found:
        client.generate(query="hi", model_id="no-such-model")
    assert not_found.value.error_code == HTTPStatus.NOT_FOUND
    with pytest.raises(BentoMLException, match="max_length") as invalid:
        client.generate(query="hi", max_length=99999)
    assert invalid.value.error_code == HTTPStatus.UNPROCESSABLE_ENTITY


def test_async_client_serves_concurrent_requests(url):
    async def ask_three() -> list[dict]:
        async with bentoml.AsyncHTTPClient(url, timeout=120) as client:
            return await asyncio.gather(*(client.generate(query=FRANCE, temperature=0) for _ in range(3)))

    answers = asyncio.run(ask_three())
    assert all("Paris" in answer["result"] for answer in answers)
