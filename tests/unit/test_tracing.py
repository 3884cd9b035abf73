"""Requests get one span each, however many messages their streamed body sends."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry.instrumentation import asgi
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

import tracing

CHUNKS = 5


async def stream(_request) -> StreamingResponse:
    async def tokens():
        for index in range(CHUNKS):
            yield f"data: {index}\n\n"

    return StreamingResponse(tokens(), media_type="text/event-stream")


def spans_of_one_streamed_request(middleware: type) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Built as BentoML builds it (_bentoml_impl/server/app.py): the class looked up on the module.
    app = middleware(Starlette(routes=[Route("/stream", stream)]), tracer_provider=provider, default_span_details=None)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/stream")

    response = asyncio.run(call())
    assert response.status_code == 200 and response.text.count("data:") == CHUNKS
    return exporter.get_finished_spans()


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "OpenTelemetryMiddleware", asgi.OpenTelemetryMiddleware)  # undone after the test
    tracing.trace_requests_not_messages()


def test_bentoml_builds_the_request_span_middleware_once_patched(patched: None) -> None:
    assert asgi.OpenTelemetryMiddleware is tracing.RequestSpanMiddleware


def test_a_streamed_request_has_one_span_with_its_status(patched: None) -> None:
    spans = spans_of_one_streamed_request(asgi.OpenTelemetryMiddleware)

    assert [span.name for span in spans] == ["GET /stream"]
    assert spans[0].attributes["http.status_code"] == 200


def test_without_the_patch_every_message_has_a_span() -> None:
    spans = spans_of_one_streamed_request(tracing.RequestSpanMiddleware.__base__)  # OpenTelemetry's own, even where patched

    assert len(spans) > CHUNKS  # what the patch removes: a span per send, and per receive
