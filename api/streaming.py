"""Server-sent events for streamed generations, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from domain import Generation

from .errors import ClientDisconnected, count_error, error_body

T = TypeVar("T")


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def server_sent_events(
    first: str | Generation, rest: AsyncIterator[str | Generation], final: Callable[[Generation], dict[str, Any]]
) -> AsyncIterator[str]:
    """`data: {"text"}` per piece of text, then `data: {"done": true, ...final}`; a failure mid-stream
    becomes a last `data: {"error", "error_type"}` event, since the status line is already sent."""

    async def items() -> AsyncIterator[str | Generation]:
        yield first
        async for item in rest:
            yield item

    try:
        async for item in items():
            yield event({"done": True, **final(item)} if isinstance(item, Generation) else {"text": item})
    except Exception as error:  # noqa: BLE001: the stream ends with an error event, never a cut connection
        body = error_body(error)
        count_error(body["error_type"])
        yield event(body)


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
