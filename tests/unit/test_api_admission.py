"""AdmissionMiddleware: past its limit a generation request is refused at once with 429."""

from __future__ import annotations

import asyncio
import json

from api.admission import AdmissionGate, AdmissionMiddleware
from api.errors import openai_error_response


def scope(path: str = "/generate", method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}


async def call(app, request_scope: dict) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(request_scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    headers = {key.decode(): value.decode() for key, value in start["headers"]}
    return start["status"], headers, json.loads(body) if body else {}


def slow_app(release: asyncio.Event):
    async def app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_requests_past_the_limit_get_429_with_retry_after_while_others_run():
    async def scenario():
        release = asyncio.Event()
        gate = AdmissionGate(limit=2)
        middleware = AdmissionMiddleware(slow_app(release), paths={"/generate"}, gate=gate)
        running = [asyncio.create_task(call(middleware, scope())) for _ in range(2)]
        await asyncio.sleep(0)
        refused = await call(middleware, scope())
        release.set()
        return refused, [await task for task in running], gate.in_flight

    (status, headers, body), admitted, left = asyncio.run(scenario())
    assert status == 429 and headers["retry-after"] == "1"
    assert body["error_type"] == "overloaded" and "limit of 2" in body["error"]
    assert [result[0] for result in admitted] == [200, 200]
    assert left == 0


def test_other_routes_and_methods_are_never_counted():
    async def scenario():
        release = asyncio.Event()
        release.set()
        middleware = AdmissionMiddleware(slow_app(release), paths={"/generate"}, gate=AdmissionGate(limit=0))
        return await call(middleware, scope("/health", "GET")), await call(middleware, scope("/load-model"))

    (health, _, _), (load, _, _) = asyncio.run(scenario())
    assert health == load == 200


def test_while_draining_new_generation_requests_get_503_and_the_one_in_flight_finishes():
    async def scenario():
        release = asyncio.Event()
        gate = AdmissionGate(limit=8)
        middleware = AdmissionMiddleware(slow_app(release), paths={"/generate"}, gate=gate)
        in_flight = asyncio.create_task(call(middleware, scope()))
        await asyncio.sleep(0)
        gate.draining = True
        refused = await call(middleware, scope())
        release.set()
        health = await call(middleware, scope("/health", "GET"))
        return refused, health, await in_flight, gate.in_flight

    (status, headers, body), (health, _, _), (finished, _, _), left = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error_type"] == "shutting_down" and "shutting down" in body["error"]
    assert health == 200 and finished == 200
    assert left == 0


def test_the_openai_routes_share_the_count_and_are_refused_in_openai_shape():
    async def scenario():
        release = asyncio.Event()
        gate = AdmissionGate(limit=1)
        generate = AdmissionMiddleware(slow_app(release), paths={"/generate"}, gate=gate)
        # As service.py stacks them: one middleware per error shape, one count.
        app = AdmissionMiddleware(generate, paths={"/v1/chat/completions"}, gate=gate, respond=openai_error_response)
        in_flight = asyncio.create_task(call(app, scope("/generate")))
        await asyncio.sleep(0)
        refused = await call(app, scope("/v1/chat/completions"))
        release.set()
        return refused, await in_flight, gate.in_flight

    (status, headers, body), (finished, _, _), left = asyncio.run(scenario())
    assert status == 429 and headers["retry-after"] == "1"
    error = body["error"]
    assert error["code"] == "overloaded" and error["type"] == "rate_limit_error" and "limit of 1" in error["message"]
    assert finished == 200 and left == 0
