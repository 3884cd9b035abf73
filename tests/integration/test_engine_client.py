"""The API side of the engine: a kept-alive connection the engine closes as it is reused costs one retry, not a 503."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import httpx
import pytest

from domain import EngineUnavailableError, Generation, GenerationParams, Prompt
from runners.client import EngineClient

PROMPT = Prompt.from_list([{"role": "user", "content": "hi"}])
PARAMS = GenerationParams(max_new_tokens=4, temperature=0.0, timeout_s=10.0)
GENERATION = Generation("Paris", "m", "stop", prompt_tokens=3, completion_tokens=1, generation_time_s=0.1,
                        max_new_tokens=4, temperature=0.0).to_dict()


def client_over(handler) -> EngineClient:
    client = EngineClient(SimpleNamespace(to_async=SimpleNamespace(url="tcp://127.0.0.1:1")))
    client._stream_http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://engine")
    return client


def engine_answer() -> httpx.Response:
    lines = [json.dumps({"text": "Paris"}), json.dumps({"generation": GENERATION})]
    return httpx.Response(200, text="\n".join(lines) + "\n")


async def collect(client: EngineClient) -> list:
    return [item async for item in client.stream_text("m", PROMPT, PARAMS)]


def test_a_stream_whose_kept_alive_connection_was_closed_is_sent_again_once():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(json.loads(request.content))
        if len(attempts) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return engine_answer()

    items = asyncio.run(collect(client_over(handler)))
    assert items[0] == "Paris" and items[1].text == "Paris"
    assert len(attempts) == 2 and attempts[0] == attempts[1]


def test_an_engine_that_stays_unreachable_is_a_503_engine_unavailable_naming_the_cause():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(EngineUnavailableError, match="ConnectError") as caught:
        asyncio.run(collect(client_over(handler)))
    assert caught.value.error_type == "engine_unavailable"


def test_a_connection_closed_mid_stream_is_not_resent():
    attempts = []

    class BrokenBody(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield (json.dumps({"text": "Par"}) + "\n").encode()
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(200, stream=BrokenBody())

    items = []

    async def read() -> None:
        async for item in client_over(handler).stream_text("m", PROMPT, PARAMS):
            items.append(item)

    with pytest.raises(EngineUnavailableError):
        asyncio.run(read())
    assert items == ["Par"] and len(attempts) == 1  # tokens already went out: a second run would repeat them


def test_a_call_through_bentomls_proxy_that_meets_a_closed_connection_is_made_once_more():
    calls = []

    class Proxy:
        async def system_info(self) -> dict:
            calls.append("system_info")
            if len(calls) == 1:
                raise aiohttp.ServerDisconnectedError()
            return {"result": {"cpu_count": 2}}

    assert asyncio.run(EngineClient(Proxy()).system_info()) == {"cpu_count": 2}
    assert len(calls) == 2
