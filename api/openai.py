"""The OpenAI-compatible API, mounted at /v1: GET /models, POST /chat/completions, POST /completions.

The handlers run the same use case as /generate (GenerateTextUseCase), so these requests share the
engine's batches, limits and errors; only the shapes differ. service.py counts the generation routes
against the admission cap, and a client that leaves stops its generation, streamed or not.
"""

from __future__ import annotations

import abc
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from domain import GenerateTextUseCase, Generation, ModelService, TokenLogprob
from domain.services import SERVICE_NAME

from .errors import error_body, openai_error_body, openai_error_response
from .openai_answers import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ModelCard,
    ModelList,
    Usage,
)
from .openai_schemas import ChatCompletionRequest, CompletionRequest
from .streaming import EventStreamResponse, Item, cancel_on_disconnect, event_stream
from .validation import InvalidBody, describe_problems, field_name, parse_json_object, read_body, replay, with_json_body

GENERATION_PATHS = ("/chat/completions", "/completions")
# What each event's data holds when `stream` is true, as /docs.json says.
STREAM_EVENTS = (
    "JSON: a chunk (`chat.completion.chunk` or `text_completion`) per piece of text, with the logprobs of the "
    "tokens that made it when asked, the last one with its finish_reason, then with stream_options.include_usage "
    "one with the usage and no choices; or "
    '{"error": {"message", "type", "param", "code"}} when generation fails after the first piece; then [DONE]'
)
T = TypeVar("T")


class Backend(Protocol):
    """What the routes need of the service: AIModelService in production, fakes in unit tests."""

    generate_text: GenerateTextUseCase
    models: ModelService


def _failure(body: dict[str, str], fields: Collection[str] = ()) -> tuple[str, str, str | None]:
    """The message, error type and OpenAI `param` of a failure's error body: the model for an unknown
    model; for a refused request, the field its message starts with, when the request has that field
    (the engine names the field that asked for a grammar it cannot compile)."""
    message, error_type = body["error"], body["error_type"]
    if error_type == "model_not_found":
        return message, error_type, "model"
    named = message.partition(": ")[0]
    return message, error_type, named if error_type == "validation_error" and named.split(".")[0] in fields else None


async def _or_error(operation: Awaitable[T], fields: Collection[str] = ()) -> T | JSONResponse:
    try:
        return await operation
    except Exception as error:  # noqa: BLE001: every failure becomes an error body, never a bare 500
        return openai_error_response(*_failure(error_body(error), fields), getattr(error, "retry_after_s", None))


@dataclass
class AnswerFormat(abc.ABC):
    """One answer's id, creation time and model, and its whole response and stream chunks in OpenAI's shapes."""

    model: str
    include_usage: bool = False
    with_logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(init=False)
    id_prefix: ClassVar[str]
    chunk_object: ClassVar[str]

    answer: ClassVar[type[ChatCompletion] | type[Completion]]

    def __post_init__(self) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"

    def whole(self, generation: Generation) -> ChatCompletion | Completion:
        return self.answer(
            id=self.id,
            created=self.created,
            model=generation.model_id,
            choices=[self._whole_choice(generation)],
            usage=Usage.of(generation),
        )

    @abc.abstractmethod
    def _whole_choice(self, generation: Generation) -> ChatChoice | CompletionChoice: ...

    @abc.abstractmethod
    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """The one choice of a chunk: a piece of text (with its tokens' logprobs when asked), or (text
        None) the finish reason."""

    def _logprobs_of(self, text: str) -> tuple[TokenLogprob, ...] | None:
        """The logprobs of the tokens that made a piece of text (a TextDelta; a plain str has none),
        when the request asked for them."""
        return getattr(text, "logprobs", ()) if self.with_logprobs else None

    def chunks(self, item: Item) -> list[dict[str, Any]]:
        if not isinstance(item, Generation):
            return [self._chunk([self._choice(item, None)])]
        last = [self._chunk([self._choice(None, item.finish_reason)])]
        if self.include_usage:  # OpenAI's usage chunk: no choices
            last.append(self._chunk([], Usage.of(item).model_dump()))
        return last

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk = {
            "id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model, "choices": choices
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk


@dataclass
class ChatFormat(AnswerFormat):
    id_prefix: ClassVar[str] = "chatcmpl"
    chunk_object: ClassVar[str] = "chat.completion.chunk"
    answer: ClassVar[type[ChatCompletion]] = ChatCompletion
    _opened: bool = field(default=False, init=False)

    def _whole_choice(self, generation: Generation) -> ChatChoice:
        logprobs = None if generation.logprobs is None else ChatLogprobs.of(generation.logprobs)
        message = AssistantMessage(content=generation.text)
        return ChatChoice(message=message, logprobs=logprobs, finish_reason=generation.finish_reason)

    def chunks(self, item: Item) -> list[dict[str, Any]]:
        if self._opened:
            return super().chunks(item)
        self._opened = True  # OpenAI's first chunk names the role
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._chunk([opening]), *super().chunks(item)]

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if text is None:
            return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        tokens = self._logprobs_of(text)
        logprobs = None if tokens is None else ChatLogprobs.of(tokens).model_dump()
        return {"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}


@dataclass
class TextFormat(AnswerFormat):
    id_prefix: ClassVar[str] = "cmpl"
    chunk_object: ClassVar[str] = "text_completion"
    answer: ClassVar[type[Completion]] = Completion
    _sent_chars: int = field(default=0, init=False)  # where the next chunk's text starts in the whole text

    def _whole_choice(self, generation: Generation) -> CompletionChoice:
        text = generation.text
        logprobs = None if generation.logprobs is None else CompletionLogprobs.of(generation.logprobs, 0, len(text))
        return CompletionChoice(text=text, logprobs=logprobs, finish_reason=generation.finish_reason)

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if text is None:
            return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        tokens = self._logprobs_of(text)
        start, self._sent_chars = self._sent_chars, self._sent_chars + len(text)
        logprobs = None if tokens is None else CompletionLogprobs.of(tokens, start, self._sent_chars).model_dump()
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}


async def _answer(
    request: Request,
    service: Backend,
    body: ChatCompletionRequest | CompletionRequest,
    shape: type[AnswerFormat],
    stream_stall_timeout_s: float,
) -> Any:
    """The whole answer, or a stream of chunks ending with `data: [DONE]`; a failure before the first
    piece of text answers with its status, one after it ends the stream with an error event."""
    command = body.to_command()
    form = shape(body.model, body.include_usage, with_logprobs=command.logprobs is not None)
    fields = type(body).model_fields.keys()
    if not body.stream:
        generation = await _or_error(cancel_on_disconnect(request, service.generate_text(command)), fields)
        return generation if isinstance(generation, Response) else form.whole(generation)
    # Until the first piece the response has not started, so a client leaving is watched here;
    # after it, the streaming response stops when the client leaves.
    opened = await _or_error(cancel_on_disconnect(request, service.generate_text.open_stream(command)), fields)
    if isinstance(opened, Response):
        return opened
    form.model, items = opened  # the chunks name the model that serves them: a fallback chain's member
    first = await anext(items)
    events = event_stream(first, items, form.chunks, lambda error: openai_error_body(*_failure(error)), last="[DONE]")
    return EventStreamResponse(events, stream_stall_timeout_s)


class JsonBodyMiddleware:
    """Reads a POST body of at most `max_body_bytes` as a JSON object, whatever its content type (as
    the service's other routes do), and hands it on as JSON for FastAPI to validate. A body too large
    or not a JSON object is answered here, in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            data = parse_json_object(await read_body(receive, self.max_body_bytes))
        except InvalidBody as error:
            await openai_error_response(error.message, error.error_type)(scope, receive, send)
            return
        body = json.dumps(data).encode()
        await self.app(with_json_body(scope, body), replay(body, receive), send)


async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = [{**item, "loc": tuple(item["loc"])[1:]} for item in error.errors()]  # every loc starts with "body"
    param = field_name(problems[0]["loc"]) if problems else "body"
    return openai_error_response(describe_problems(problems), "validation_error", None if param == "body" else param)


def _route_error(status: int, detail: str, method: str, path: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A path or method that does not exist: OpenAI's shape, with no error type of ours to name."""
    message = (
        f"{detail}: {method} {path}; this API has GET /v1/models, GET /v1/models/{{id}}, "
        f"POST /v1/chat/completions and POST /v1/completions"
    )
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _no_such_route(request: Request, error: HTTPException) -> JSONResponse:
    return _route_error(error.status_code, error.detail, request.method, request.url.path, error.headers)


class UnroutedPathMiddleware:
    """BentoML mounts the /v1 app passively: a path under /v1 that none of its routes matches, with or
    without a trailing slash (the outer router redirects those), never reaches it and gets the outer
    router's plain-text 404. So does a path with a line break (`/v1/models/a%0Ab`), which Starlette's
    mount pattern `^/v1/(?P<path>.*)$` does not cross. This answers both with OpenAI's 404 instead."""

    def __init__(self, app: ASGIApp, openai_app: Starlette, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self.mount = Mount(prefix, app=openai_app)
        self.routes = openai_app.routes

    def _reaches_the_app(self, scope: Scope) -> bool:
        match, child = self.mount.matches(scope)
        child_scope = {**scope, **child}
        return match is not Match.NONE and any(route.matches(child_scope)[0] is not Match.NONE for route in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path.startswith(self.prefix + "/"):
            toggled = {**scope, "path": path.removesuffix("/") if path.endswith("/") else path + "/"}
            if not (self._reaches_the_app(scope) or self._reaches_the_app(toggled)):
                await _route_error(404, "Not Found", scope["method"], path)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_openai_app(backend: Callable[[], Backend], max_body_bytes: int, stream_stall_timeout_s: float) -> FastAPI:
    """`backend` gives the service instance that handles a request (bentoml.get_current_service); a stream
    is dropped when its client takes none of it for `stream_stall_timeout_s` (EventStreamResponse)."""
    app = FastAPI(title="OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(JsonBodyMiddleware, max_body_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _no_such_route)
    current = Depends(backend)

    @app.get("/models", response_model=ModelList)
    async def list_models(service: Backend = current) -> Any:
        models = await _or_error(service.models.list_models())
        if isinstance(models, Response):
            return models
        return ModelList(data=[ModelCard.of(model, SERVICE_NAME) for model in models])

    @app.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str, service: Backend = current) -> Any:
        model = await _or_error(service.models.get_model(model_id))
        return model if isinstance(model, Response) else ModelCard.of(model, SERVICE_NAME)

    @app.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request, service: Backend = current) -> Any:
        """Chat messages through the model's chat template; `stream` for server-sent chunks."""
        return await _answer(request, service, body, ChatFormat, stream_stall_timeout_s)

    @app.post("/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request, service: Backend = current) -> Any:
        """Raw text that the model continues, without the chat template; `stream` for server-sent chunks."""
        return await _answer(request, service, body, TextFormat, stream_stall_timeout_s)

    return app
