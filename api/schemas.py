"""Request and response bodies. Request bounds come from the settings, so they live in one place."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from domain import Generation, Model
from domain.generation import MAX_TEMPERATURE
from settings import DEVICE_NAMES, MODEL_ID_PATTERN, Settings, validate_device

MAX_LENGTH_LIMIT = 2048
MIN_TIMEOUT_S = 0.01
# vLLM's names and meanings, so that a benchmark can ask every server for exactly N tokens.
MIN_TOKENS_DESCRIPTION = "no end of sequence before this many new tokens; at most max_length (or MAX_NEW_TOKENS)"
IGNORE_EOS_DESCRIPTION = "keep generating past an end of sequence, up to max_length"


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
DeviceName = Annotated[str | None, AfterValidator(_device_name), Field(description=f"one of {DEVICE_NAMES}")]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def request_schemas(settings: Settings) -> tuple[type[Request], type[Request], type[Request]]:
    """Builds the request schemas with the operator's bounds: (generate, load, unload)."""
    Query = Annotated[str, Field(min_length=1, max_length=settings.max_query_chars), AfterValidator(no_nul)]
    Passage = Annotated[str, Field(max_length=settings.max_context_item_chars), AfterValidator(no_nul)]

    class GenerateRequest(Request):
        query: Query = Field(description="the question or instruction")
        context: list[Passage] = Field(
            default_factory=list, max_length=settings.max_context_items, description="passages from the vector store"
        )
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
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")
        timeout: float | None = Field(
            None,
            strict=True,  # lax, `true` would pass as 1 second
            ge=MIN_TIMEOUT_S,  # not gt=0: OpenAPI 3.0, which BentoML writes, has no numeric exclusiveMinimum
            le=settings.max_generation_time,
            description=f"seconds this request may take, queueing included; at most MAX_GENERATION_TIME ({settings.max_generation_time:g})",
        )
        use_async: bool = Field(True, strict=True, description="generation always runs off the event loop, on the engine's threads")
        min_tokens: int | None = Field(
            None, strict=True, ge=0, le=MAX_LENGTH_LIMIT, description=MIN_TOKENS_DESCRIPTION
        )
        ignore_eos: bool = Field(False, strict=True, description=IGNORE_EOS_DESCRIPTION)

    class LoadModelRequest(Request):
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")
        device: DeviceName = Field(None, description=f"{DEVICE_NAMES}; default DEVICE_TYPE ({settings.device_type})")

    class UnloadModelRequest(Request):
        model_id: ModelId | None = Field(None, description=f"default DEFAULT_MODEL_ID ({settings.default_model_id})")

    return GenerateRequest, LoadModelRequest, UnloadModelRequest


class EmptyRequest(Request):
    """For routes that take no parameters: an empty body or `{}`; anything else is refused."""


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
        )


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


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"] = Field(
        description="degraded: the default model is not loaded; unhealthy: a model's engine failed"
    )
    service: str
    default_model_id: str
    default_model_loaded: bool
    loaded_models_count: int
    loaded_models: list[Model]
    available_models: list[str]
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
