"""The API side of the engine's stream: real aiohttp connections over a Unix socket to a scripted engine.

A kept-alive connection the engine closes as it is reused costs one retry, not a 503; a stream read to
its end gives its connection back for the next one; a stream left early closes its connection, which
is how the engine learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from adapters.engine_client import STREAM_ROUTE, EngineClient
from domain import EngineUnavailableError, Generation, GenerationParams, Prompt

PROMPT = Prompt.from_list([{"role": "user", "content": "hi"}])
PARAMS = GenerationParams(max_new_tokens=4, temperature=0.0, timeout_s=10.0)
GENERATION = Generation("Paris", "m", "stop", prompt_tokens=3, completion_tokens=1, generation_time_s=0.1,
                        max_new_tokens=4, temperature=0.0).to_dict()
ANSWER = [json.dumps({"text": "Paris"}) + "\n", json.dumps({"generation": GENERATION}) + "\n"]


class ScriptedEngine:
    """A bare HTTP/1.1 server on a Unix socket. Each connection gets the next script of the list
    (the last one repeats): a list of body chunks, which it answers chunked; or "close" (say nothing
    and hang up); or ("cut", chunks): send those chunks, then hang up mid-body."""

    def __init__(self, socket_path: Path, scripts: list) -> None:
        self.socket_path = socket_path
        self.scripts = scripts
        self.requests: list[tuple[int, str, dict]] = []  # (connection number, path, body)
        self.connections = 0
        self.closed_by_client: list[int] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> ScriptedEngine:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        script = self.scripts[min(connection, len(self.scripts)) - 1]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode().split("\r\n")
                headers = dict(line.split(": ", 1) for line in header_lines if line)
                body = await reader.readexactly(int(headers["Content-Length"]))
                self.requests.append((connection, request_line.split()[1], json.loads(body)))
                if script == "close":
                    writer.close()
                    return
                cut = isinstance(script, tuple)
                chunks = script[1] if cut else script
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                for chunk in chunks:
                    data = chunk.encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if cut:
                    writer.close()
                    return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.append(connection)  # the client hung up on this connection


def client_of(engine: ScriptedEngine) -> EngineClient:
    return EngineClient(SimpleNamespace(to_async=SimpleNamespace(url=f"file://{engine.socket_path}")), timeout_s=10)


async def collect(client: EngineClient) -> list:
    return [item async for item in client.stream_text("m", PROMPT, PARAMS)]


def test_streams_read_to_their_end_share_one_kept_alive_connection(tmp_path):
    async def scenario() -> tuple[ScriptedEngine, list, list]:
        async with ScriptedEngine(tmp_path / "engine.sock", [ANSWER]) as engine:
            client = client_of(engine)
            first, second = await collect(client), await collect(client)
            await client.close()
        return engine, first, second

    engine, first, second = asyncio.run(scenario())
    assert first[0] == "Paris" and first[1].text == "Paris" and first[1].completion_tokens == 1
    assert second[0] == "Paris" and second[1].text == "Paris"
    assert [(connection, path) for connection, path, _ in engine.requests] == [(1, STREAM_ROUTE), (1, STREAM_ROUTE)]
    body = engine.requests[0][2]
    assert Prompt.from_dict(body["prompt"]) == PROMPT and GenerationParams.from_dict(body["params"]) == PARAMS


def test_a_stream_left_early_closes_its_connection_so_the_engine_stops(tmp_path):
    slow_answer = [json.dumps({"text": f"token{i} "}) + "\n" for i in range(50)] + ANSWER[1:]

    async def scenario() -> tuple[ScriptedEngine, list]:
        async with ScriptedEngine(tmp_path / "engine.sock", [slow_answer, ANSWER]) as engine:
            client = client_of(engine)
            async for first in client.stream_text("m", PROMPT, PARAMS):
                break  # the caller went away after one token
            for _ in range(100):  # the engine notices as its next write fails
                if engine.closed_by_client:
                    break
                await asyncio.sleep(0.02)
            after = await collect(client)
            await client.close()
        return engine, [first, *after]

    engine, items = asyncio.run(scenario())
    assert items[0] == "token0 " and items[1] == "Paris"
    assert engine.closed_by_client[:1] == [1]
    assert [connection for connection, _, _ in engine.requests] == [1, 2]  # the next stream opened its own


def test_a_stream_whose_kept_alive_connection_was_closed_is_sent_again_once(tmp_path):
    async def scenario() -> tuple[ScriptedEngine, list]:
        async with ScriptedEngine(tmp_path / "engine.sock", ["close", ANSWER]) as engine:
            client = client_of(engine)
            items = await collect(client)
            await client.close()
        return engine, items

    engine, items = asyncio.run(scenario())
    assert items[0] == "Paris" and items[1].text == "Paris"
    assert [connection for connection, _, _ in engine.requests] == [1, 2]
    assert engine.requests[0][2] == engine.requests[1][2]


def test_an_engine_that_stays_unreachable_is_a_503_engine_unavailable_naming_the_cause(tmp_path):
    client = EngineClient(SimpleNamespace(to_async=SimpleNamespace(url=f"file://{tmp_path / 'nobody.sock'}")))

    async def scenario() -> None:
        try:
            await collect(client)
        finally:
            await client.close()

    with pytest.raises(EngineUnavailableError, match="ConnectorError") as caught:
        asyncio.run(scenario())
    assert caught.value.error_type == "engine_unavailable"


def test_a_connection_closed_mid_stream_is_not_resent(tmp_path):
    async def scenario() -> tuple[ScriptedEngine, list, Exception | None]:
        items, error = [], None
        async with ScriptedEngine(tmp_path / "engine.sock", [("cut", [json.dumps({"text": "Par"}) + "\n"])]) as engine:
            client = client_of(engine)
            try:
                async for item in client.stream_text("m", PROMPT, PARAMS):
                    items.append(item)
            except EngineUnavailableError as raised:
                error = raised
            await client.close()
        return engine, items, error

    engine, items, error = asyncio.run(scenario())
    assert isinstance(error, EngineUnavailableError) and error.error_type == "engine_unavailable"
    assert items == ["Par"] and len(engine.requests) == 1  # tokens already went out: a second run would repeat them


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
