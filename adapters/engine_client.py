"""The API process's view of the engine: the domain ports, answered by the engine service."""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import aiohttp

from domain import (
    ClassifyParams,
    Decision,
    EngineUnavailableError,
    Generation,
    GenerationError,
    GenerationParams,
    Model,
    ModelRepository,
    OverloadedError,
    Prompt,
    SystemMonitor,
    TextDelta,
    TokenLogprob,
    raise_if_error,
)
from domain.generation import REQUEST_TIMEOUT
from engine.core.queue_board import NO_TICKET, QueueBoard, door_ticket
from engine.core.scheduler import QueueFull
from engine.core.service_rate import PastDeadline, Work
from metrics import SHED

STREAM_ROUTE = "/stream_text"
T = TypeVar("T")
# How a call fails when the engine process is gone (BentoML's proxy and our stream both speak aiohttp).
ENGINE_UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
# A kept-alive connection the engine closes as it is reused fails before the engine read the request:
# a disconnect, or a reset or broken pipe as the request is written. (ClientOSError also covers a
# refused connection; trying that once more costs nothing.)
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# Below the engine's keep-alive (uvicorn's 5 s), so the client drops an idle connection before the server does.
ENGINE_KEEPALIVE_S = 2.0
# English in a BPE vocabulary runs about four characters a token.
CHARS_PER_TOKEN = 4


def decode_line(line: str) -> str | Generation:
    message = json.loads(line)
    raise_if_error(message)
    if "generation" in message:
        return Generation.from_dict(message["generation"])
    return TextDelta(message["text"], tuple(map(TokenLogprob.from_dict, message.get("logprobs", ()))))


def prompt_work(prompt: Prompt) -> int:
    """The API worker's guess at the prompt tokens the engine will compute, to shed by before the
    engine counts them. A leading system message is left out: requests share it, and the engine's
    prefix cache holds it."""
    messages = prompt.messages[1:] if prompt.messages and prompt.messages[0].role == "system" else prompt.messages
    return (sum(len(message.content) for message in messages) + len(prompt.text or "")) // CHARS_PER_TOKEN


def unreachable(error: Exception) -> EngineUnavailableError:
    return EngineUnavailableError(
        f"the generation engine cannot be reached ({type(error).__name__}); it is restarting or shutting down, retry shortly"
    )


async def once_more_if_stale(call: Callable[[], Awaitable[T]]) -> T:
    """A second try, on a fresh connection, is safe: the engine did not read the first request."""
    try:
        return await call()
    except STALE_CONNECTION:
        return await call()


async def unwrap(call: Callable[[], Awaitable[dict[str, Any]]]) -> Any:
    try:
        reply = await once_more_if_stale(call)
    except ENGINE_UNREACHABLE as error:
        raise unreachable(error) from error
    raise_if_error(reply)
    return reply["result"]


class EngineClient(ModelRepository, SystemMonitor):
    """`engine` is the GenerationEngine itself (in-process) or BentoML's proxy to its process.

    With the engine's queue `board` (engine/core/queue_board.py), a generation that the queue would
    push past its deadline is refused here, before the hop: 429 in a millisecond, where the engine
    would answer the same after the hop and its tokenizer."""

    def __init__(self, engine: Any, timeout_s: float = 120.0, board: QueueBoard | None = None) -> None:
        self._engine = engine
        self._timeout_s = timeout_s
        self._engine_http: aiohttp.ClientSession | None = None
        self._board = board

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        return Model.from_dict(await unwrap(lambda: self._engine.load_model(model_id=model_id, device=device)))

    async def unload_model(self, model_id: str) -> Model:
        return Model.from_dict(await unwrap(lambda: self._engine.unload_model(model_id=model_id)))

    async def get_model(self, model_id: str) -> Model:
        return Model.from_dict(await unwrap(lambda: self._engine.get_model(model_id=model_id)))

    async def list_models(self) -> list[Model]:
        return [Model.from_dict(model) for model in await unwrap(self._engine.list_models)]

    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams) -> Decision:
        with self._ticket(model_id, prompt, params) as ticket:
            request = {"model_id": model_id, "prompt": prompt.to_dict(), "params": params.to_dict(), "ticket": ticket}
            return Decision.from_dict(await unwrap(lambda: self._post("classify", request)))

    def reserve(self, model_id: str, prompt: Prompt, params: GenerationParams | ClassifyParams) -> int:
        """The request's ticket on the queue board; OverloadedError (429) when the queue ahead of it
        would make it finish after its deadline."""
        if self._board is None:
            return NO_TICKET
        own = Work(prompt_work(prompt), getattr(params, "max_new_tokens", 0))  # a decision decodes nothing
        try:
            return self._board.reserve(model_id, own, params.priority, params.timeout_s)
        except QueueFull as full:
            raise OverloadedError.queue_full(model_id, full.waiting, full.max_queue_size) from None
        except PastDeadline as late:
            SHED.labels(model=model_id).inc()
            by_own_timeout = params.timeout_by == REQUEST_TIMEOUT
            raise OverloadedError.past_deadline(model_id, late.expected_s, late.allowed_s, by_own_timeout) from None

    def release(self, ticket: int) -> None:
        if self._board is not None:
            self._board.release(ticket)

    @contextmanager
    def _ticket(self, model_id: str, prompt: Prompt, params: GenerationParams | ClassifyParams) -> Iterator[int]:
        """The ticket the request's door reserved, or one reserved (and released) here."""
        if (reserved := door_ticket.get()) != NO_TICKET:
            yield reserved
            return
        ticket = self.reserve(model_id, prompt, params)
        try:
            yield ticket
        finally:
            self.release(ticket)

    async def _post(self, api: str, request: dict[str, Any]) -> dict[str, Any]:
        """A call on the hop generation streams take, not BentoML's proxy: the proxy keeps idle
        connections past the engine's keep-alive, and a burst after a pause meets closed ones."""
        remote = getattr(self._engine, "to_async", None)
        if remote is None:  # the engine object itself, in this process
            return await getattr(self._engine, api)(**request)
        http = self._engine_http or self._open_engine_http(remote.url)
        async with http.post(f"/{api}", json=request) as response:
            if response.status >= 400:
                body = (await response.read()).decode(errors="replace")
                raise GenerationError(f"the engine answered {response.status}: {body}")
            return await response.json()

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        with self._ticket(model_id, prompt, params) as ticket:
            request = {"model_id": model_id, "prompt": prompt.to_dict(), "params": params.to_dict(), "ticket": ticket}
            buffered = ""
            chunks = self._stream_chunks(request)
            async with aclosing(chunks):  # leaving early closes the connection, which cancels the generation
                try:
                    async for chunk in chunks:
                        buffered += chunk
                        *complete, buffered = buffered.split("\n")
                        for line in complete:
                            yield decode_line(line)
                except ENGINE_UNREACHABLE as error:
                    raise unreachable(error) from error

    async def _stream_chunks(self, request: dict[str, Any]) -> AsyncIterator[str]:
        remote = getattr(self._engine, "to_async", None)  # BentoML's proxy to the engine's process
        if remote is None:  # the engine object itself, in this process
            async with aclosing(self._engine.stream_text(**request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # BentoML's proxy never closes a stream its reader leaves early (1.4.39): the engine would go on
        # generating for nobody. This connection is ours, and closing it is synchronous, so the anyio
        # scope that cancels a streaming response cannot skip it.
        http = self._engine_http or self._open_engine_http(remote.url)
        response = await once_more_if_stale(lambda: http.post(STREAM_ROUTE, json=request))
        try:
            if response.status >= 400:
                body = (await response.read()).decode(errors="replace")
                raise GenerationError(f"the engine answered {response.status}: {body}")
            text = codecs.getincrementaldecoder("utf-8")(errors="replace")
            async for chunk in response.content.iter_any():
                yield text.decode(chunk)
        finally:
            # A response read to its end already gave its connection back to the pool; one left
            # early closes it here, which is how the engine learns to stop generating.
            response.close()

    def _open_engine_http(self, url: str) -> aiohttp.ClientSession:
        address = urlparse(url)
        # limit=0: no cap on connections; the engine's queue bounds the streams, a cap would queue them here.
        if address.scheme == "file":
            connector = aiohttp.UnixConnector(
                path=url2pathname(address.path), keepalive_timeout=ENGINE_KEEPALIVE_S, limit=0
            )
            base_url = "http://engine"
        else:
            connector = aiohttp.TCPConnector(keepalive_timeout=ENGINE_KEEPALIVE_S, limit=0)
            base_url = f"http://{address.netloc}" if address.scheme == "tcp" else url
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout_s, sock_read=self._timeout_s)
        self._engine_http = aiohttp.ClientSession(base_url=base_url, connector=connector, timeout=timeout)
        return self._engine_http

    async def close(self) -> None:
        if self._engine_http is not None:
            await self._engine_http.close()

    async def memory_usage(self) -> dict[str, Any]:
        return await unwrap(self._engine.memory_usage)

    async def optimize_memory(self) -> dict[str, Any]:
        return await unwrap(self._engine.optimize_memory)

    async def system_info(self) -> dict[str, Any]:
        return await unwrap(self._engine.system_info)
