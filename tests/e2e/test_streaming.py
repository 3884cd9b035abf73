"""POST /generate/stream through a real server: SSE framing, the final event, errors, clients."""

from __future__ import annotations

import json

import bentoml
import httpx
import pytest

FRANCE = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0}


def events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]


def test_stream_sends_text_events_then_a_final_event_with_usage(url):
    # A max_length no other test sends: the answer is generated here, not served from the response cache.
    body = {**FRANCE, "max_length": 9}
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/generate/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = events(response)
    *texts, final = received
    assert texts and all(set(event) == {"text"} for event in texts)
    assert final["done"] is True and final["finish_reason"] == "stop"
    assert "".join(event["text"] for event in texts).strip() == final["result"] == "The capital of France is Paris."
    assert final["completion_tokens"] == len(texts) + 1  # the end-of-sequence token is counted, not sent
    assert 0 < final["time_to_first_token_ms"] <= final["generation_time_ms"]


def test_stream_errors_before_the_first_token_keep_their_status(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        missing = http.post("/generate/stream", json={"query": "hi", "model_id": "no-such-model"})
        invalid = http.post("/generate/stream", json={"query": "hi", "max_length": 0})
    assert missing.status_code == 404 and missing.json()["error_type"] == "model_not_found"
    assert invalid.status_code == 422 and "max_length" in invalid.json()["error"]


def test_bentoml_sync_client_reads_the_stream(url):
    with bentoml.SyncHTTPClient(url, timeout=60) as client:
        body = "".join(client.generate_stream(**FRANCE))
    final = json.loads(body.strip().split("data: ")[-1])
    assert final["result"] == "The capital of France is Paris."


@pytest.mark.parametrize("concurrent", [4])
def test_concurrent_streams_each_get_their_own_answer(url, concurrent):
    import asyncio

    async def one(query: str) -> str:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream("POST", "/generate/stream", json={"query": query, "temperature": 0}) as response:
                finals = [json.loads(line[6:]) async for line in response.aiter_lines() if '"done"' in line]
        return finals[0]["result"]

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(FRANCE["query"]) for _ in range(concurrent)))

    assert asyncio.run(all_of_them()) == ["The capital of France is Paris."] * concurrent
