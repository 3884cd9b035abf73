"""Request and response bodies. Request bounds come from the settings, so they live in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from domain import Decision, Generation, InvalidRequestError, Model, TokenLogprob
from domain.generation import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_PRIORITY,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_PRIORITY,
    PRIORITY_NAMES,
    priority_value,
)
from settings import DEVICE_NAMES, MODEL_ID_PATTERN, Settings, validate_device

MAX_LENGTH_LIMIT = 2048
MIN_TIMEOUT_S = 0.01
# vLLM's names and meanings, so that a benchmark can ask every server for exactly N tokens.
MIN_TOKENS_DESCRIPTION = "no end of sequence before this many new tokens; at most max_length (or MAX_NEW_TOKENS)"
IGNORE_EOS_DESCRIPTION = "keep generating past an end of sequence, up to max_length"
LOGPROBS_DESCRIPTION = (
    "each generated token's log probability: of the distribution it was chosen from, the logits after masks "
    "divided by the temperature (temperature 0 as 1), before top_p (vLLM's processed log probabilities)"
)
PRIORITY_DESCRIPTION = (
    f"lower runs first and is refused last when the queue is full: {', '.join(PRIORITY_NAMES)} "
    f"({', '.join(map(str, PRIORITY_NAMES.values()))}) or an integer from {MIN_PRIORITY} to {MAX_PRIORITY}; default normal"
)


def top_logprobs_need_logprobs(cls: type, top_logprobs: int | None, info: ValidationInfo) -> int | None:
    """A field validator for /generate and /v1 alike: top_logprobs means nothing without logprobs."""
    if top_logprobs is not None and not info.data.get("logprobs"):
        raise ValueError(f"only allowed when logprobs is true, got {top_logprobs}")
    return top_logprobs


def _priority(value: Any) -> Any:
    if value is not None:
        try:
            priority_value(value)
        except InvalidRequestError as error:
            raise ValueError(str(error).removeprefix("priority: ")) from None
    return value


Priority = Annotated[
    int | str | None,
    BeforeValidator(_priority),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(PRIORITY_NAMES)},
                {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
                {"type": "null"},
            ],
            "description": PRIORITY_DESCRIPTION,
        }
    ),
]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
Labels = Annotated[list[Label], Field(min_length=1, max_length=MAX_LABELS)]


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _device_name(value: str | None) -> str | None:
    return None if value is None else validate_device(value)


ModelId = Annotated[
    str,
    Field(pattern=MODEL_ID_PATTERN, description="a model id in the model store, such as smollm2-135m-instruct"),
]
# What validate_device takes: a name in any case, with whitespace around it.
DEVICE_NAME_PATTERN = r"^\s*([Aa][Uu][Tt][Oo]|[Cc][Pp][Uu]|[Mm][Pp][Ss]|[Cc][Uu][Dd][Aa](:\d+)?)\s*$"
DeviceName = Annotated[
    Annotated[str, WithJsonSchema({"type": "string", "pattern": DEVICE_NAME_PATTERN})] | None,
    AfterValidator(_device_name),
    Field(description=f"one of {DEVICE_NAMES}"),
]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestSchemas:
    generate: type[Request]
    generate_stream: type[Request]
    classify: type[Request]
    batch_item: type[Request]
    load_model: type[Request]
    unload_model: type[Request]


def request_schemas(settings: Settings) -> RequestSchemas:
    """Builds the request schemas with the operator's bounds."""
    Query = Annotated[str, Field(min_length=1, max_length=settings.max_query_chars), AfterValidator(no_nul)]
    Passage = Annotated[str, Field(max_length=settings.max_context_item_chars), AfterValidator(no_nul)]

    Context = Annotated[
        list[Passage], Field(max_length=settings.max_context_items, description="passages from the vector store")
    ]

    class BatchItem(Request):
        """One item of a batch: its passages, and its own query if it does not share the request's."""

        query: Query | None = Field(None, description="this item's query; default the request's")
        context: Context = Field(default_factory=list)

    # Items are checked one by one (api/batch.py), so a bad item gets its own error; the schema documents them.
    Items = Annotated[
        list[Any] | None,
        Field(None, max_length=settings.max_batch_items),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "array", "items": BatchItem.model_json_schema(), "maxItems": settings.max_batch_items},
                    {"type": "null"},
                ],
                "description": f"the batch form: up to MAX_BATCH_ITEMS ({settings.max_batch_items}) items sharing "
                "the query (the instruction) and every other field, answered in order, each with its result or "
                "its own error",
            }
        ),
    ]

    class Verdict(Request):
        """What /generate, /generate/stream and /classify share."""

        query: Query = Field(description="the question or instruction")
        context: Context = Field(default_factory=list)
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")
        timeout: float | None = Field(
            None,
            strict=True,  # lax, `true` would pass as 1 second
            ge=MIN_TIMEOUT_S,  # not gt=0: OpenAPI 3.0, which BentoML writes, has no numeric exclusiveMinimum
            le=settings.max_generation_time,
            description=f"seconds this request may take, queueing included; at most MAX_GENERATION_TIME ({settings.max_generation_time:g})",
        )
        priority: Priority = None

    class Batch(Request):
        """The batch form of /generate and /classify (a stream has one answer)."""

        items: Items = None

        @field_validator("items")
        @classmethod
        def _no_shared_context(cls, items: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
            if items is not None and info.data.get("context"):
                raise ValueError("each item brings its own context: give none beside items")
            return items

    class ClassifyRequest(Batch, Verdict):  # items after context: their validator reads it
        labels: Labels = Field(description="the allowed answers; each is scored over all its tokens after the prompt")

    class GenerateStreamRequest(Verdict):
        max_length: int | None = Field(
            None,
            strict=True,
            ge=1,
            le=MAX_LENGTH_LIMIT,
            description=f"new tokens to generate; capped by MAX_NEW_TOKENS ({settings.max_new_tokens})",
        )
        temperature: float | None = Field(
            None, strict=True, ge=0.0, le=MAX_TEMPERATURE, description=f"0 is greedy; default GENERATION_TEMPERATURE ({settings.generation_temperature})"
        )
        use_async: bool = Field(True, strict=True, description="generation always runs off the event loop, on the engine's threads")
        min_tokens: int | None = Field(
            None, strict=True, ge=0, le=MAX_LENGTH_LIMIT, description=MIN_TOKENS_DESCRIPTION
        )
        ignore_eos: bool = Field(False, strict=True, description=IGNORE_EOS_DESCRIPTION)
        logprobs: bool = Field(False, strict=True, description=LOGPROBS_DESCRIPTION)
        top_logprobs: int | None = Field(
            None,
            strict=True,
            ge=0,
            le=MAX_TOP_LOGPROBS,
            description="with logprobs: the likeliest tokens at each position",
        )

        _with_logprobs = field_validator("top_logprobs")(top_logprobs_need_logprobs)

    class GenerateRequest(Batch, GenerateStreamRequest):
        choices: Labels | None = Field(
            None, description="answer with the likeliest of these (as /classify does), with every choice's probability"
        )

        @field_validator("choices")
        @classmethod
        def _nothing_generated(cls, choices: list[str] | None, info: ValidationInfo) -> list[str] | None:
            """A decision generates no token: the fields that shape generated tokens have no meaning for it."""
            if choices is not None:
                for name in ("max_length", "temperature", "min_tokens", "top_logprobs", "ignore_eos", "logprobs"):
                    if info.data.get(name) not in (None, False):
                        given = f"{name} {info.data[name]}"
                        raise ValueError(f"a decision generates nothing, so it takes no {name}, got {given}")
            return choices

    class LoadModelRequest(Request):
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")
        device: DeviceName = Field(None, description=f"{DEVICE_NAMES}; default DEVICE_TYPE ({settings.device_type})")

    class UnloadModelRequest(Request):
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")

    return RequestSchemas(
        GenerateRequest, GenerateStreamRequest, ClassifyRequest, BatchItem, LoadModelRequest, UnloadModelRequest
    )


class EmptyRequest(Request):
    """For routes that take no parameters: an empty body or `{}`; anything else is refused."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's UTF-8 bytes: a token may hold part of a character")


class TokenLogprobResponse(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the likeliest tokens at this position, likeliest first")

    @classmethod
    def of(cls, logprob: TokenLogprob) -> TokenLogprobResponse:
        top = [TopLogprob(token=each.token, logprob=each.logprob, bytes=list(each.bytes)) for each in logprob.top]
        return cls(token=logprob.token, logprob=logprob.logprob, bytes=list(logprob.bytes), top_logprobs=top)


class GenerateResponse(BaseModel):
    result: str
    model_id: str
    finish_reason: str = Field(description="stop: the model ended its answer; length: max_length was reached")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    max_new_tokens: int
    temperature: float
    generation_time_ms: float
    time_to_first_token_ms: float
    cached_prompt_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")
    total_time_ms: float
    cached: bool = Field(description="served from the response cache: nothing was generated, the generation times are 0")
    logprobs: list[TokenLogprobResponse] | None = Field(None, description="each generated token's, with logprobs")
    probabilities: dict[str, float] | None = Field(
        None, description="with choices: each choice's probability, normalized over the choices; result is the likeliest"
    )

    @classmethod
    def of_decision(cls, decision: Decision, total_time_s: float) -> GenerateResponse:
        """A decision among choices: nothing is generated, the chosen label is the result."""
        decision_ms = round(decision.decision_time_s * 1000, 2)
        return cls(
            result=decision.label,
            model_id=decision.model_id,
            finish_reason="stop",
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=0,
            total_tokens=decision.prompt_tokens,
            max_new_tokens=0,
            temperature=0.0,
            generation_time_ms=decision_ms,
            time_to_first_token_ms=decision_ms,
            cached_prompt_tokens=decision.cached_prompt_tokens,
            total_time_ms=round(total_time_s * 1000, 2),
            cached=False,
            probabilities=decision.probabilities,
        )

    @classmethod
    def of(cls, generation: Generation, total_time_s: float) -> GenerateResponse:
        return cls(
            result=generation.text.strip(),  # the engine keeps the text as generated; /generate trims its edges
            model_id=generation.model_id,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            generation_time_ms=round(generation.generation_time_s * 1000, 2),
            time_to_first_token_ms=round(generation.time_to_first_token_s * 1000, 2),
            cached_prompt_tokens=generation.cached_prompt_tokens,
            total_time_ms=round(total_time_s * 1000, 2),
            cached=generation.cached,
            logprobs=None if generation.logprobs is None else list(map(TokenLogprobResponse.of, generation.logprobs)),
        )


class ClassifyResponse(BaseModel):
    label: str = Field(description="the likeliest label")
    probabilities: dict[str, float] = Field(description="every label's probability, normalized over the labels")
    model_id: str
    prompt_tokens: int
    cached_prompt_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")
    decision_time_ms: float
    total_time_ms: float

    @classmethod
    def of(cls, decision: Decision, total_time_s: float) -> ClassifyResponse:
        return cls(
            label=decision.label,
            probabilities=decision.probabilities,
            model_id=decision.model_id,
            prompt_tokens=decision.prompt_tokens,
            cached_prompt_tokens=decision.cached_prompt_tokens,
            decision_time_ms=round(decision.decision_time_s * 1000, 2),
            total_time_ms=round(total_time_s * 1000, 2),
        )


class ItemError(BaseModel):
    error: str = Field(description="what was wrong with this item: the field, the limit and the value")
    error_type: str


class BatchGenerateResponse(BaseModel):
    results: list[GenerateResponse | ItemError] = Field(description="one per item, in order")
    total_time_ms: float


class BatchClassifyResponse(BaseModel):
    results: list[ClassifyResponse | ItemError] = Field(description="one per item, in order")
    total_time_ms: float


class ModelStateResponse(BaseModel):
    status: str
    model: Model


class OptimizeMemoryResponse(BaseModel):
    status: str
    gc_collected_objects: int
    rss_before_mb: float
    rss_after_mb: float
    freed_mb: float
    cuda_cache_cleared: bool
    duration_s: float


class ProcessMemory(BaseModel):
    """The engine process's memory and the machine's; GPU entries only where CUDA devices exist."""

    model_config = ConfigDict(extra="allow")
    rss_mb: float
    vms_mb: float
    percent: float
    system_total_mb: float
    system_available_mb: float
    system_used_percent: float
    gpu: list[dict[str, Any]]


class LoadedModelFootprint(BaseModel):
    id: str
    device: str
    memory_mb: float | None
    kv_cache_mb: float | None
    last_used_at: str | None
    idle_unload_at: str | None = Field(description="when MODEL_IDLE_TIMEOUT unloads it if unused; null: never")


class MemoryUsageResponse(ProcessMemory):
    loaded_models_count: int
    loaded_models: list[LoadedModelFootprint]


class ProviderHealth(BaseModel):
    """An external model's provider as this API worker sees it."""

    model_id: str
    base_url: str
    provider_model: str = Field(description="the provider's name for the model")
    circuit: Literal["closed", "half_open", "open"] = Field(
        description="open: it failed too often and is not called until retry_in_s passes; half_open: one call probes it"
    )
    retry_in_s: float = Field(description="seconds until an open circuit lets a probe call through; 0 otherwise")
    in_flight: int
    max_concurrency: int


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"] = Field(
        description="degraded: the default model is not loaded; unhealthy: a model's engine failed"
    )
    service: str
    default_model_id: str
    default_model_loaded: bool
    loaded_models_count: int
    loaded_models: list[Model]
    available_models: list[str] = Field(description="every model id: the store's, external models and fallback chains")
    providers: list[ProviderHealth] = Field(description="the external models' providers, from PROVIDERS_FILE")
    memory_usage: ProcessMemory


class SystemInfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    cpu_count: int | None
    torch_threads: int
    memory: ProcessMemory
    cuda_available: bool
    loaded_models_count: int


class ModelsResponse(BaseModel):
    default_model_id: str
    models: list[Model]
