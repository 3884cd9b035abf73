"""BentoML's own Python clients against the real server."""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

import bentoml
import httpx
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


def test_task_api_submits_and_polls_a_generation(url):
    # AsyncHTTPClient: SyncHTTPClient's submit fails in BentoML 1.4.39 (it closes `self._opened_files`,
    # which it does not have), after the task was sent.
    async def submit_and_poll() -> tuple[str, dict]:
        async with bentoml.AsyncHTTPClient(url, timeout=120) as client:
            task = await client.generate_task.submit(query=FRANCE, temperature=0)
            deadline = time.monotonic() + 60
            while (await task.get_status()).value == "in_progress" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return (await task.get_status()).value, await task.get()

    status, answer = asyncio.run(submit_and_poll())
    assert status == "completed"
    assert "Paris" in answer["result"]


def test_task_api_reports_a_failed_generation_with_its_error(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        submitted = http.post("/generate-task/submit", json={"query": "hi", "model_id": "no-such-model"})
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["task_id"]
        deadline = time.monotonic() + 30
        while http.get("/generate-task/status", params={"task_id": task_id}).json()["status"] == "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert http.get("/generate-task/status", params={"task_id": task_id}).json()["status"] == "failed"
        result = http.get("/generate-task/get", params={"task_id": task_id})
        assert result.status_code == 404 and result.json()["error_type"] == "model_not_found"
        invalid = http.post("/generate-task/submit", json={"query": ""})
        assert invalid.status_code == 422 and "query" in invalid.json()["error"]
