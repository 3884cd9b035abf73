"""Server-sent events for streamed generations, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from domain import Generation

from .errors import ClientDisconnected, count_error, error_body
from .schemas import TokenLogprobResponse

T = TypeVar("T")


# What each event's data holds on /generate/stream, as /docs.json says.
STREAM_EVENTS = (
    'JSON: {"text"} (with "logprobs" when asked) as tokens come, then {"done": true, "result", '
    '"finish_reason", ...} with the usage, '
    'or {"error", "error_type"} when generation fails after the first token'
)


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


Item = str | Generation


async def event_stream(
    first: Item,
    rest: AsyncIterator[Item],
    render: Callable[[Item], list[dict[str, Any]]],
    render_error: Callable[[dict[str, str]], dict[str, Any]],
    last: str | None = None,
) -> AsyncIterator[str]:
    """`data: {...}` for each payload an item renders to, and `data: <last>` at the end; a failure
    mid-stream becomes a last error event, since the status line is already sent."""

    async def items() -> AsyncIterator[Item]:
        yield first
        async for item in rest:
            yield item

    try:
        async for item in items():
            for payload in render(item):
                yield event(payload)
    except Exception as error:  # noqa: BLE001: the stream ends with an error event, never a cut connection
        body = error_body(error)
        count_error(body["error_type"])
        yield event(render_error(body))
    if last is not None:
        yield f"data: {last}\n\n"


def server_sent_events(
    first: Item, rest: AsyncIterator[Item], final: Callable[[Generation], dict[str, Any]]
) -> AsyncIterator[str]:
    """/generate/stream: `data: {"text"}` per piece of text (with `"logprobs"`, its tokens', when asked),
    then `data: {"done": true, ...final}`, or a last `data: {"error", "error_type"}`."""

    def render(item: Item) -> list[dict[str, Any]]:
        if isinstance(item, Generation):
            return [{"done": True, **final(item)}]
        logprobs = getattr(item, "logprobs", ())
        if logprobs:
            return [{"text": str(item), "logprobs": [TokenLogprobResponse.of(each).model_dump() for each in logprobs]}]
        return [{"text": str(item)}]

    return event_stream(first, rest, render, lambda body: body)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, operation: Awaitable[T]) -> T:
    """Runs the operation, cancelling it (and so its generation) if the client disconnects first."""
    work = asyncio.ensure_future(operation)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    raise ClientDisconnected("the client disconnected; its generation was cancelled")
