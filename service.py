"""The AI Model Service: its HTTP API, in front of the generation engine.

    bentoml serve service:AIModelService --port 8003

POST routes are BentoML APIs (so `bentoml.SyncHTTPClient` knows them); GET routes come from a
mounted FastAPI app, because BentoML APIs are POST only, and BentoML merges its routes into
`/docs.json`; the OpenAI-compatible API is a FastAPI app mounted at /v1 (api/openai.py). Each handler
turns the request into a command, runs it through the domain, and answers the result or the error's
status.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import bentoml
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.drain import defer_sigterm, drain_limit_s
from adapters.engine_client import ENGINE_UNREACHABLE, EngineClient
from adapters.model_router import ModelRouter
from adapters.providers import external_models
from adapters.providers_file import ProvidersFile, read_providers_file
from adapters.response_cache import response_cache_for
from api.admission import AdmissionGate, AdmissionMiddleware
from api.auth import ApiKeyMiddleware, exempt_paths, warn_when_open
from api.batch import answer_items, classify_command, generation_command
from api.errors import openai_error_response, response_for
from api.openai import GENERATION_PATHS as OPENAI_GENERATION_PATHS
from api.openai import STREAM_EVENTS as OPENAI_STREAM_EVENTS
from api.openai import UnroutedPathMiddleware, build_openai_app
from api.openai_schemas import ChatCompletionRequest, CompletionRequest
from api.openapi import DocumentedErrorsMiddleware
from api.schemas import (
    BatchClassifyResponse,
    BatchGenerateResponse,
    ClassifyResponse,
    EmptyRequest,
    GenerateResponse,
    HealthResponse,
    MemoryUsageResponse,
    ModelsResponse,
    ModelStateResponse,
    OptimizeMemoryResponse,
    SystemInfoResponse,
    request_schemas,
)
from api.streaming import STREAM_EVENTS, EventStreamResponse, cancel_on_disconnect, server_sent_events
from api.validation import Door, RequestValidationMiddleware
from domain import (
    Classify,
    GenerateText,
    GenerateTextUseCase,
    Generation,
    InvalidRequestError,
    LoadModel,
    ModelService,
    OptimizeMemory,
    UnloadModel,
)
from engine.core.queue_board import NO_TICKET, QueueBoard
from engine.models.catalog import BentoModelStoreCatalog
from engine.service import GenerationEngine
from metrics import count_fallback
from settings import get_settings
from tracing import trace_requests_not_messages

settings = get_settings()
trace_requests_not_messages()  # before BentoML builds the apps of this process
schemas = request_schemas(settings)
GenerateRequest, GenerateStreamRequest, ClassifyRequest, LoadModelRequest, UnloadModelRequest = (
    schemas.generate, schemas.generate_stream, schemas.classify, schemas.load_model, schemas.unload_model
)
# The engine enforces MAX_GENERATION_TIME inside generation; this only catches a stuck hop.
HTTP_TIMEOUT_S = int(settings.max_generation_time) + 60
READINESS_PROBE_TIMEOUT_S = 2
# This worker's generation requests: counted against the cap, refused while draining for shutdown.
admission = AdmissionGate(limit=settings.admission_limit_per_worker)
# External models and fallback chains, checked against the store once at start-up: a bad file stops the service.
providers = (
    read_providers_file(settings.providers_file, BentoModelStoreCatalog().model_ids())
    if settings.providers_file
    else ProvidersFile()
)


async def answer(operation: Awaitable[Any], ctx: bentoml.Context | None = None) -> Any:
    """The operation's result, or the JSON error response its exception maps to."""
    try:
        return await operation
    except Exception as error:  # noqa: BLE001: every failure becomes a JSON error body, never a bare 500
        response = response_for(error)
        if ctx is not None:  # BentoML gives a handler with a context the context's status
            ctx.response.status_code = response.status_code
        return response


# No docs of its own: BentoML serves them all at /docs.json.
routes = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


def get_route(path: str, summary: str, response_model: type, handler: Callable[[AIModelService], Awaitable[Any]]) -> None:
    async def endpoint() -> Response:
        result = await answer(handler(bentoml.get_current_service()))
        return result if isinstance(result, Response) else JSONResponse(result)

    # The response model documents the route; the handler's own response skips FastAPI's re-validation.
    operation_id = path.strip("/").replace("-", "_")
    routes.get(path, summary=summary, response_model=response_model, operation_id=operation_id)(endpoint)


get_route("/health", "Status, loaded models and memory", HealthResponse, lambda service: service.models.health())
get_route("/system-info", "CPU, threads, devices and settings", SystemInfoResponse, lambda service: service.models.system_info())
get_route("/memory-usage", "Memory, and each loaded model's size and last use", MemoryUsageResponse, lambda service: service.models.memory_usage())
get_route("/models", "The models in the store, loaded or not", ModelsResponse, lambda service: service.list_models())
OPENAI_PREFIX = "/v1"
openai_app = build_openai_app(bentoml.get_current_service, settings.max_body_bytes, settings.stream_stall_timeout)


@bentoml.service(
    name="ai-model",
    workers=settings.max_processes,
    traffic={"timeout": HTTP_TIMEOUT_S},
    http={"host": settings.host, "port": settings.port},
    runner_probe={"enabled": False},  # __is_ready__ probes the engine itself; BentoML's probe would ask again
)
@bentoml.asgi_app(routes, path="/")
@bentoml.asgi_app(openai_app, path=OPENAI_PREFIX)
class AIModelService:
    engine = bentoml.depends(GenerationEngine)

    def __init__(self) -> None:
        self.engine_client = client = EngineClient(self.engine, timeout_s=HTTP_TIMEOUT_S, board=QueueBoard.of_this_server())
        self.repository = ModelRouter(client, external_models(providers.models, os.environ))
        self.models = ModelService(
            self.repository,
            client,
            settings.default_model_id,
            settings.device_type,
            settings.model_idle_timeout,
            fallbacks=providers.chains,
        )
        self.response_cache = response_cache_for(settings)
        self.generate_text = GenerateTextUseCase(
            self.models,
            self.repository,
            settings.prompt_builder,
            settings.generation_limits,
            settings.auto_load_models,
            cache=self.response_cache,
            on_fallback=lambda chain, member, error: count_fallback(chain, member, error.error_type),
        )
        defer_sigterm(
            busy=lambda: admission.in_flight > 0,
            on_drain=lambda: setattr(admission, "draining", True),
            limit_s=drain_limit_s(settings.max_generation_time),
        )

    @bentoml.on_deployment
    def warn_without_api_keys() -> None:
        """Once per server: `bentoml serve` runs it in its own process, before it starts the workers."""
        warn_when_open(settings.accepted_api_keys)

    async def __is_ready__(self) -> bool:
        """503 from /readyz while draining, and while the engine is down (crashed, restarting) or not ready."""
        if admission.draining:
            return False
        try:  # a restarting engine's socket accepts and then says nothing: hence the outer timeout too
            async with asyncio.timeout(READINESS_PROBE_TIMEOUT_S):
                return await self.engine.is_ready(READINESS_PROBE_TIMEOUT_S)
        except (TimeoutError, *ENGINE_UNREACHABLE):  # BentoML's own probe lets these escape as a 500
            return False

    @bentoml.on_shutdown
    async def close_clients(self) -> None:
        await self.engine_client.close()
        await self.repository.close()
        if self.response_cache is not None:
            await self.response_cache.close()

    # The routes that answer a single or a batch body declare a plain object: BentoML documents one body
    # per API and its Python client reads the answer through that one; ANSWERS documents both.
    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **request: Any) -> dict[str, Any]:
        """The answer to `query` with its `context`; with `choices`, the likeliest choice and every choice's
        probability; with `items`, one answer per item, in order."""
        return await answer(cancel_on_disconnect(ctx.request, self._generate(request)), ctx)

    @bentoml.api(route="/generate/stream", input_spec=GenerateStreamRequest)
    async def generate_stream(self, ctx: bentoml.Context, **request: Any) -> AsyncGenerator[str, None]:
        """Server-sent events: `data: {"text"}` as tokens come, then `data: {"done": true, ...}` with
        the finish reason and usage. Errors found before the first token answer with their status."""
        return await answer(self._event_stream(ctx.request, request), ctx)

    @bentoml.task(route="/generate-task", input_spec=GenerateRequest)
    async def generate_task(self, **request: Any) -> dict[str, Any]:
        """Submit-and-poll generation: POST /generate-task/submit, then GET /generate-task/status and /get."""
        return await answer(self._generate(request))

    @bentoml.api(route="/classify", input_spec=ClassifyRequest)
    async def classify(self, ctx: bentoml.Context, **request: Any) -> dict[str, Any]:
        """A decision: the likeliest of `labels` as the answer to `query` with its `context`, and every
        label's probability, from one prompt computation; with `items`, one decision per item, in order."""
        return await answer(cancel_on_disconnect(ctx.request, self._classify(request)), ctx)

    @bentoml.api(route="/load-model", input_spec=LoadModelRequest)
    async def load_model(self, **request: Any) -> ModelStateResponse:
        return await answer(self._model_state("loaded", self.models.load_model(LoadModel(**request))))

    @bentoml.api(route="/unload-model", input_spec=UnloadModelRequest)
    async def unload_model(self, **request: Any) -> ModelStateResponse:
        return await answer(self._model_state("unloaded", self.models.unload_model(UnloadModel(**request))))

    @bentoml.api(route="/optimize-memory", input_spec=EmptyRequest)
    async def optimize_memory(self) -> OptimizeMemoryResponse:
        return await answer(self._optimized())

    def admit(self, path: str, fields: dict[str, Any]) -> int:
        """The door's decision (api/validation.py, Door) on a single generation or decision: its
        ticket on the engine's queue board, or OverloadedError when the queue would make it miss its
        deadline. Batch items reserve each their own on the way; a request the response cache may
        answer is checked after the lookup; a request for an external model asks nothing of the
        engine, and one for a fallback chain is refused by its members one by one."""
        if fields.get("items") is not None:
            return NO_TICKET
        command = classify_command(fields) if path == "/classify" else generation_command(fields)
        try:
            work = self.generate_text.engine_work(command)
        except InvalidRequestError:  # answered by the handler, in its usual words
            return NO_TICKET
        if work is None or not self.repository.is_local(work[0]):
            return NO_TICKET
        return self.engine_client.reserve(*work)

    async def list_models(self) -> dict[str, Any]:
        models = await self.models.list_models()
        return {"default_model_id": settings.default_model_id, "models": [model.to_dict() for model in models]}

    async def _generate(self, fields: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()

        async def generated(command: GenerateText | Classify) -> GenerateResponse:
            if isinstance(command, Classify):
                decision = await self.generate_text.classify(command)
                return GenerateResponse.of_decision(decision, time.perf_counter() - started)
            return GenerateResponse.of(await self.generate_text(command), time.perf_counter() - started)

        if fields["items"] is None:
            return (await generated(generation_command(fields))).model_dump()
        results = await answer_items(fields, schemas.batch_item, generation_command, generated)
        total_ms = round((time.perf_counter() - started) * 1000, 2)
        return BatchGenerateResponse(results=results, total_time_ms=total_ms).model_dump()

    async def _classify(self, fields: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()

        async def decided(command: Classify) -> ClassifyResponse:
            return ClassifyResponse.of(await self.generate_text.classify(command), time.perf_counter() - started)

        if fields["items"] is None:
            return (await decided(classify_command(fields))).model_dump()
        results = await answer_items(fields, schemas.batch_item, classify_command, decided)
        total_ms = round((time.perf_counter() - started) * 1000, 2)
        return BatchClassifyResponse(results=results, total_time_ms=total_ms).model_dump()

    async def _event_stream(self, request: Request, fields: dict[str, Any]) -> EventStreamResponse:
        command = generation_command(fields)
        started = time.perf_counter()
        items = aiter(self.generate_text.stream(command))
        # Until the first token the response has not started, so a client leaving is watched here.
        first = await cancel_on_disconnect(request, anext(items))

        def final(generation: Generation) -> dict[str, Any]:
            return GenerateResponse.of(generation, time.perf_counter() - started).model_dump()

        return EventStreamResponse(server_sent_events(first, items, final), settings.stream_stall_timeout)

    @staticmethod
    async def _model_state(status: str, operation: Awaitable) -> ModelStateResponse:
        model = await operation
        return ModelStateResponse(status=status, model=model)

    async def _optimized(self) -> OptimizeMemoryResponse:
        return OptimizeMemoryResponse(status="optimized", **await self.models.optimize_memory(OptimizeMemory()))


GENERATION_ROUTES = {"/generate", "/generate/stream", "/generate-task", "/generate-task/submit", "/classify"}
OPENAI_ROUTES = {OPENAI_PREFIX + route.path for route in openai_app.routes}
OPENAI_GENERATION_ROUTES = {OPENAI_PREFIX + path for path in OPENAI_GENERATION_PATHS}
# The errors each route can answer, as /docs.json lists them.
ENGINE_ERRORS = {"engine_unavailable", "internal_error"}
BODY_ERRORS = ENGINE_ERRORS | {"validation_error", "payload_too_large"}
LOAD_ERRORS = BODY_ERRORS | {"model_not_found", "device_not_available", "insufficient_memory", "generation_error"}
PROVIDER_ERRORS = {"provider_error", "provider_unavailable"}
GENERATION_ERRORS = LOAD_ERRORS | PROVIDER_ERRORS | {
    "model_not_loaded", "model_unloading", "overloaded", "shutting_down", "generation_timeout"
}
# A decision through an external model needs labels that begin apart, and its provider's logprobs.
DECISION_ROUTES = {"/generate", "/generate-task", "/classify"}
ERRORS_BY_ROUTE = {
    **dict.fromkeys(GENERATION_ROUTES | OPENAI_GENERATION_ROUTES, GENERATION_ERRORS),
    **dict.fromkeys(DECISION_ROUTES, GENERATION_ERRORS | {"external_model"}),
    # A submitted task is refused only at the door; what generation answers, /generate-task/get answers.
    "/generate-task/submit": {"validation_error", "payload_too_large", "overloaded", "shutting_down"},
    "/load-model": LOAD_ERRORS | {"external_model"},
    "/unload-model": BODY_ERRORS | {"model_not_found", "model_not_loaded", "external_model"},
    "/optimize-memory": BODY_ERRORS,
    **dict.fromkeys((route.path for route in routes.routes), ENGINE_ERRORS),  # the GET routes
    OPENAI_PREFIX + "/models": ENGINE_ERRORS,
    OPENAI_PREFIX + "/models/{model_id}": ENGINE_ERRORS | {"model_not_found"},
}
# Middlewares added first wrap those added later. CORS is outermost: it answers a browser's preflight, which
# carries no key, and puts its headers on every answer to an allowed origin, a 401 too. The key check comes
# next: a request without a key is refused before its body is read or it takes an admission slot.
if settings.cors_origins:
    AIModelService.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],  # the key travels in Authorization, never in cookies: any header is safe to allow
        expose_headers=["Retry-After"],
    )
API_KEY_EXEMPT = exempt_paths(settings.metrics_require_api_key) if settings.accepted_api_keys else None
if API_KEY_EXEMPT is not None:
    AIModelService.add_asgi_middleware(
        ApiKeyMiddleware, keys=settings.accepted_api_keys, exempt=API_KEY_EXEMPT, openai_prefix=OPENAI_PREFIX
    )
AIModelService.add_asgi_middleware(
    DocumentedErrorsMiddleware,
    spec=lambda: AIModelService.openapi_spec.asdict(),
    errors_by_route=ERRORS_BY_ROUTE,
    event_stream_routes={
        "/generate/stream": STREAM_EVENTS,
        **dict.fromkeys(OPENAI_GENERATION_ROUTES, OPENAI_STREAM_EVENTS),
    },
    openai_routes=OPENAI_ROUTES,
    exact_models=[ChatCompletionRequest, CompletionRequest],
    answers={
        **dict.fromkeys(("/generate", "/generate-task"), (GenerateResponse, BatchGenerateResponse)),
        "/classify": (ClassifyResponse, BatchClassifyResponse),
    },
    # BentoML's server answers every task cancel with 400 "task cancellation is not supported in local
    # development server", and `bentoml serve` is this service's server, in the container too.
    unserved=["/generate-task/cancel"],
    task_routes=["/generate-task"],
    api_key_exempt=API_KEY_EXEMPT,
)
AIModelService.add_asgi_middleware(UnroutedPathMiddleware, openai_app=openai_app, prefix=OPENAI_PREFIX)
# Outermost first: a request over the cap is refused before its body is read. Both share one count.
AIModelService.add_asgi_middleware(AdmissionMiddleware, paths=GENERATION_ROUTES, gate=admission)
AIModelService.add_asgi_middleware(
    AdmissionMiddleware, paths=OPENAI_GENERATION_ROUTES, gate=admission, respond=openai_error_response
)


class ServiceDoor(Door):
    def admit(self, path: str, fields: dict[str, Any]) -> int:
        return bentoml.get_current_service().admit(path, fields)

    def release(self, ticket: int) -> None:
        bentoml.get_current_service().engine_client.release(ticket)


AIModelService.add_asgi_middleware(
    RequestValidationMiddleware,
    schemas={
        "/generate": GenerateRequest,
        "/generate/stream": GenerateStreamRequest,
        "/generate-task": GenerateRequest,
        "/generate-task/submit": GenerateRequest,
        "/classify": ClassifyRequest,
        "/load-model": LoadModelRequest,
        "/unload-model": UnloadModelRequest,
        "/optimize-memory": EmptyRequest,
    },
    max_body_bytes=settings.max_body_bytes,
    # Tasks run after their submit has answered: their engine calls reserve their own tickets.
    door=ServiceDoor(),
    door_paths=frozenset({"/generate", "/generate/stream", "/classify"}),
)
