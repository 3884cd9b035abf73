"""The service's configuration: every environment variable, typed and validated once at start-up."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from domain import GenerationLimits, PromptBuilder
from domain.prompt import DEFAULT_SYSTEM_PROMPT

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# What an `Authorization: Bearer` header carries unchanged (visible ASCII, no space), and no comma: API_KEYS
# separates keys by commas, so a key of the file must be one that API_KEYS could give too.
API_KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
API_KEY_RULE = "a key is visible ASCII characters with no space or comma, as an Authorization header carries it"
# Starlette's CORS middleware compares a browser's Origin header with these exactly: no path, no trailing slash.
ORIGIN_PATTERN = re.compile(r"\*|https?://[^/\s?#]+")
# Settings whose value is never shown, not even in a start-up error.
SECRET_SETTINGS = {"api_keys"}


def validate_device(value: str) -> str:
    device = value.strip().lower()
    if not DEVICE_PATTERN.match(device):
        raise ValueError(f"must be one of {DEVICE_NAMES}, got {value!r}")
    return device


def comma_separated(value: object) -> object:
    """A variable's `a, b,c` as ("a", "b", "c"); blank entries are dropped, so an empty variable is none."""
    if isinstance(value, str):
        return tuple(entry.strip() for entry in value.split(",") if entry.strip())
    return value


def check_api_key(key: str, where: str) -> str:
    if not API_KEY_PATTERN.fullmatch(key):
        raise ValueError(f"{where} is not a usable key: {API_KEY_RULE}")  # never the key itself
    return key


class ApiKeysFile(BaseModel):
    """API_KEYS_FILE's keys, read once at start-up."""

    model_config = ConfigDict(frozen=True)
    path: str
    keys: tuple[SecretStr, ...]


def read_api_keys_file(value: object) -> object:
    """One key a line; blank lines and lines that start with # are skipped."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the keys file {value}: {error}") from None
    keys = [
        check_api_key(line.strip(), f"line {number} of {value}")
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not keys:
        raise ValueError(f"the keys file {value} holds no key (one a line; blank lines and # comments are skipped)")
    return ApiKeysFile(path=value, keys=keys)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_file=None)

    # The ten core variables: the deployment sets them (bentofile.yaml, deploy/) at these defaults.
    device_type: str = Field("auto", description=f"device for models: {DEVICE_NAMES}")
    cpu_threads: int = Field(4, ge=1, le=512, description="torch CPU threads in the engine")
    gpu_memory_fraction: float = Field(0.8, gt=0.0, le=1.0, description="share of GPU memory the engine may use")
    max_workers: int = Field(8, ge=1, le=256, description="engine threads that run loads and generations")
    max_processes: int = Field(2, ge=1, le=64, description="HTTP worker processes of the API service")
    max_generation_time: float = Field(30.0, gt=0.0, le=3600.0, description="seconds a generation may run")
    max_new_tokens: int = Field(10, ge=1, le=32768, description="most new tokens a request gets")
    generation_temperature: float = Field(0.1, ge=0.0, le=2.0, description="temperature when a request gives none")
    max_memory_usage: float = Field(0.9, gt=0.0, le=1.0, description="highest share of system memory in use")
    min_memory_gb: float = Field(2.0, ge=0.0, description="least free memory (GB) a model load must leave")

    # Ours.
    default_model_id: str = Field("smollm2-135m-instruct", pattern=MODEL_ID_PATTERN)
    preload_default_model: bool = Field(True, description="load the default model at start-up")
    auto_load_models: bool = Field(True, description="load a model on its first request")
    model_idle_timeout: float = Field(0.0, ge=0.0, description="seconds unused before a model is unloaded; 0 = never")
    model_dtype: str = Field("auto", description="auto: bfloat16 on CUDA and MPS, and on a CPU with native bf16 for a bf16 checkpoint; else float32")
    quantization: str = Field("none", description="int8: int8 Linear layers on the CPU (CUDA and MPS ignore it)")
    linear_kernels: Literal["tuned", "in_place", "mkl"] = Field(
        "tuned",
        description="fp32 CPU linear layers: tuned (the fastest kernel measured per shape and row count, weight "
        "copies allowed), in_place (the same without copies), mkl (F.linear everywhere)",
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, max_length=8000)
    max_query_chars: int = Field(32_000, ge=1)
    max_context_items: int = Field(64, ge=0)
    max_context_item_chars: int = Field(32_000, ge=1)
    max_batch_items: int = Field(64, ge=1, le=1024, description="items in one batch request to /generate or /classify")
    stream_stall_timeout: float = Field(
        10.0, gt=0.0, le=3600.0, description="seconds a stream's client may take none of the bytes waiting for it"
    )
    # Batching (measured defaults: BENCHMARKS.md).
    max_batch_size: int = Field(32, ge=1, le=1024, description="sequences per batch step; 1 turns batching off")
    batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0, description="how long an idle engine waits to gather a burst")
    max_concurrent_requests: int = Field(
        512, ge=1, le=100_000, description="generation requests in flight across the HTTP workers; past it, 429"
    )
    max_queue_size: int = Field(256, ge=1, le=100_000, description="requests waiting per model; past it, 429")
    prefill_token_budget: int = Field(512, ge=16, le=65536, description="prompt tokens computed per batch step")
    kv_cache_mb: int | None = Field(
        None, ge=16, description="each loaded model's KV cache (MiB); unset: what the memory limits leave, up to 1024"
    )
    # The response cache of deterministic requests (README, "Response cache").
    response_cache_size: int = Field(1024, ge=0, description="answers kept per worker without Redis; 0 = no cache")
    response_cache_ttl: float = Field(3600.0, ge=0.0, description="seconds a cached answer is served; 0 = no limit")
    redis_url: str | None = Field(None, description="redis:// URL of the cache shared by workers and instances")
    redis_timeout: float = Field(0.2, gt=0.0, le=10.0, description="seconds a Redis call may take before it is skipped")
    # External models and fallback chains (README, "External models and fallback chains").
    providers_file: str | None = Field(None, description="YAML or JSON file of external models and fallback chains")
    # API keys and CORS (README, "API keys and CORS").
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated keys a client sends as `Authorization: Bearer <key>`; none: the API is open"
    )
    api_keys_file: Annotated[ApiKeysFile | None, NoDecode] = Field(
        None, description="a file of keys, one a line (blank lines and # comments skipped), accepted beside API_KEYS"
    )
    metrics_require_api_key: bool = Field(True, description="with API keys set, /metrics needs a key too")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated origins browsers may call from, or *; none: no CORS headers"
    )
    host: str = "127.0.0.1"
    port: int = Field(8003, ge=1, le=65535)

    @field_validator("device_type")
    @classmethod
    def _device(cls, value: str) -> str:
        return validate_device(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if urlparse(value).scheme not in REDIS_SCHEMES:
            raise ValueError(f"must start with {' or '.join(scheme + '://' for scheme in REDIS_SCHEMES)}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> object:
        keys = comma_separated(value)
        if keys == () and isinstance(value, str):  # an empty Secret must not open the API
            raise ValueError("is set but holds no key: unset it to serve without keys")
        if isinstance(keys, tuple):
            for number, key in enumerate(keys, start=1):
                check_api_key(key, f"key {number} of {len(keys)}")
        return keys

    _api_keys_file = field_validator("api_keys_file", mode="before")(read_api_keys_file)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _cors_origins(cls, value: object) -> object:
        origins = comma_separated(value)
        for origin in origins if isinstance(origins, tuple) else ():
            if not ORIGIN_PATTERN.fullmatch(origin):
                raise ValueError(f"each origin is * or scheme://host[:port], with no path or trailing slash, got {origin!r}")
        # Browsers send the scheme and host in lower case, and Starlette compares them exactly.
        return tuple(origin.lower() for origin in origins) if isinstance(origins, tuple) else origins

    @field_validator("model_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}, got {value!r}")
        return value

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, value: str, info: ValidationInfo) -> str:
        if value not in QUANTIZATIONS:
            raise ValueError(f"must be one of {', '.join(QUANTIZATIONS)}, got {value!r}")
        dtype = info.data.get("model_dtype", "auto")  # absent when MODEL_DTYPE itself failed
        if value == "int8" and dtype not in ("auto", "float32"):
            raise ValueError(f"int8 layers take float32 input: needs MODEL_DTYPE auto or float32, got {dtype!r}")
        return value

    @property
    def accepted_api_keys(self) -> tuple[SecretStr, ...]:
        """API_KEYS' and API_KEYS_FILE's keys together; none: every route is open."""
        from_file = self.api_keys_file.keys if self.api_keys_file else ()
        return tuple(dict.fromkeys((*self.api_keys, *from_file)))

    @property
    def max_body_bytes(self) -> int:
        """The largest body the text limits allow: 4 bytes a UTF-8 character, and room for the other fields."""
        characters = self.max_query_chars + self.max_context_items * self.max_context_item_chars
        return characters * 4 + 64 * 1024

    @property
    def admission_limit_per_worker(self) -> int:
        return max(1, -(-self.max_concurrent_requests // self.max_processes))

    @property
    def generation_limits(self) -> GenerationLimits:
        return GenerationLimits(
            max_new_tokens=self.max_new_tokens,
            default_temperature=self.generation_temperature,
            max_generation_time_s=self.max_generation_time,
        )

    @property
    def prompt_builder(self) -> PromptBuilder:
        return PromptBuilder(self.system_prompt)


class ConfigurationError(SystemExit):
    """Stops the process at start-up with a message that names each bad variable."""


def describe_errors(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        variable = str(item["loc"][0]).upper() if item["loc"] else "?"
        shown = "<hidden>" if variable.lower() in SECRET_SETTINGS else repr(item.get("input"))
        problems.append(f"{variable}={shown}: {item['msg']}")
    return "invalid configuration: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(describe_errors(error)) from None
