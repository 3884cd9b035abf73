"""Server-sent events for streamed generations, cancellation when the client leaves, and the drop of
a stream whose client stops reading."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from domain import Generation
from metrics import STREAMS_DROPPED

from .client_connection import ClientConnection
from .errors import ClientDisconnected, count_error, error_body
from .schemas import TokenLogprobResponse

logger = logging.getLogger(__name__)

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
) -> AsyncGenerator[str, None]:
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
) -> AsyncGenerator[str, None]:
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


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, operation: Awaitable[T]) -> T:
    """Runs the operation, cancelling it (and so its generation) if the client disconnects first."""
    work = asyncio.ensure_future(operation)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    raise ClientDisconnected("the client disconnected; its generation was cancelled")


class EventStreamResponse(StreamingResponse):
    """Server-sent events to a client that must keep taking them. When bytes have waited for the client
    and it has acknowledged none of them for `stall_timeout_s` (STREAM_STALL_TIMEOUT), the stream is
    dropped: its events are closed, which cancels its generation and frees its batch slot; its connection
    is reset; the drop is logged and counted. A client that reads slowly but keeps taking bytes is waited
    for. Without a ClientConnection to watch (another server or system) a stream is not bounded."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[str, None], stall_timeout_s: float) -> None:
        super().__init__(content)
        self.stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = ClientConnection.of(send)
        if connection is None:
            await super().__call__(scope, receive, send)
            return
        try:
            async with asyncio.timeout(None) as deadline:
                watch = StallWatch(connection, deadline, self.stall_timeout_s)
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    watch.stop()
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._drop(scope, receive, connection)

    async def _drop(self, scope: Scope, receive: Receive, connection: ClientConnection) -> None:
        await self.body_iterator.aclose()
        connection.reset()
        STREAMS_DROPPED.labels(reason="stalled").inc()
        client = ":".join(map(str, scope.get("client") or ("unknown",)))
        logger.warning(
            "dropped the stream of %s %s to %s: the client took none of it for %s s (STREAM_STALL_TIMEOUT); "
            "its generation is cancelled and its connection reset",
            scope["method"], scope["path"], client, self.stall_timeout_s,
        )
        await _disconnected(receive)  # once the server has seen the connection go, the response needs no end


class StallWatch:
    """Keeps `deadline` at `stall_timeout_s` after the client last took bytes or had none waiting for it,
    looking at its connection `CHECKS_PER_TIMEOUT` times a stall timeout."""

    CHECKS_PER_TIMEOUT = 4

    def __init__(self, connection: ClientConnection, deadline: asyncio.Timeout, stall_timeout_s: float) -> None:
        self.connection = connection
        self.deadline = deadline
        self.stall_timeout_s = stall_timeout_s
        self.loop = asyncio.get_running_loop()
        self.acknowledged = connection.delivery().acknowledged
        self.progressed_at = self.loop.time()
        self.check = self.loop.call_soon(self._check)

    def _check(self) -> None:
        if self.deadline.expired():  # the stream is being dropped
            return
        try:
            acknowledged, waiting = self.connection.delivery()
        except OSError:  # the connection is closed: the client left, which ends the stream
            return
        if acknowledged != self.acknowledged or not waiting:
            self.acknowledged, self.progressed_at = acknowledged, self.loop.time()
        self.deadline.reschedule(self.progressed_at + self.stall_timeout_s)
        self.check = self.loop.call_later(self.stall_timeout_s / self.CHECKS_PER_TIMEOUT, self._check)

    def stop(self) -> None:
        self.check.cancel()
