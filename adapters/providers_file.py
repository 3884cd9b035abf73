"""The providers file (PROVIDERS_FILE, YAML or JSON): external models served by OpenAI-compatible
providers, and fallback chains. Read and checked once at start-up: a bad file stops the service with
a message that names the file, the entry and the value (README, "External models and fallback chains").

    models:
      - model_id: gpt-mini                  # the id callers use
        base_url: https://api.example.com/v1
        model: gpt-4o-mini                  # the provider's name for it
        api_key_env: EXAMPLE_API_KEY        # the variable that holds the key; never the key itself
    fallbacks:
      smollm-or-gpt: [smollm2-135m-instruct, gpt-mini]
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from settings import MODEL_ID_PATTERN, ConfigurationError

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _http_url(value: str) -> str:
    address = urlparse(value)
    if address.scheme not in ("http", "https") or not address.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN)]


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CircuitBreakerSettings(Entry):
    failure_threshold: int = Field(5, ge=1, le=1000, description="failures in a row that open the circuit")
    cooldown_s: float = Field(30.0, gt=0.0, le=3600.0, description="seconds an open circuit refuses calls")


class ProviderEntry(Entry):
    """An external model: the id callers use, where it is served and how it is called."""

    model_id: ModelId
    base_url: Annotated[str, AfterValidator(_http_url)] = Field(description="the provider's OpenAI-compatible API")
    model: str = Field(min_length=1, max_length=256, description="the provider's name for the model")
    api_key_env: str = Field(pattern=ENV_NAME_PATTERN, description="the environment variable that holds the key")
    timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="seconds the provider may take to start its answer, and between its pieces"
    )
    connect_timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="seconds to open a connection")
    max_retries: int = Field(2, ge=0, le=10, description="retries of a call the provider never answered (see README)")
    max_concurrency: int = Field(16, ge=1, le=10_000, description="calls in flight to the provider per API worker")
    queue_timeout_s: float = Field(
        5.0, ge=0.0, le=3600.0, description="seconds a call past max_concurrency waits for a place before its 429"
    )
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()


class ProvidersFile(Entry):
    models: list[ProviderEntry] = Field(default_factory=list)
    fallbacks: dict[str, Annotated[list[ModelId], Field(min_length=2)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ProvidersFile:
        """Ids are unique across the store, the external models and the chains; every chain member is a
        model (local or external), named once; a chain is never a member, so chains have no cycles."""
        local_ids: Collection[str] = (info.context or {}).get("local_ids", ())
        external_ids = [entry.model_id for entry in self.models]
        for index, model_id in enumerate(external_ids):
            if model_id in local_ids:
                raise ValueError(
                    f"models.{index}.model_id: {model_id!r} is also a model in the store; give it another id"
                )
            if model_id in external_ids[:index]:
                raise ValueError(f"models.{index}.model_id: {model_id!r} is declared twice")
        known = sorted({*local_ids, *external_ids})
        for chain_id, members in self.fallbacks.items():
            if chain_id in known:
                raise ValueError(f"fallbacks.{chain_id}: the chain's id is already a model's id")
            for index, member in enumerate(members):
                where = f"fallbacks.{chain_id}.{index}"
                if member in self.fallbacks:
                    raise ValueError(f"{where}: {member!r} is a fallback chain; a chain's members are models")
                if member not in known:
                    raise ValueError(f"{where}: {member!r} is no model (models: {', '.join(known) or 'none'})")
                if member in members[:index]:
                    raise ValueError(f"{where}: {member!r} is named twice in the chain")
        return self

    @property
    def chains(self) -> dict[str, tuple[str, ...]]:
        return {chain_id: tuple(members) for chain_id, members in self.fallbacks.items()}


def _problems(error: ValidationError) -> str:
    described = []
    for item in error.errors(include_url=False):
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error", "extra_forbidden"):
            message += f", got {item.get('input')!r}"
        if item["loc"]:  # the checks across entries name their own place
            message = ".".join(str(part) for part in item["loc"]) + ": " + message
        described.append(message)
    return "; ".join(described)


def read_providers_file(
    path: str | Path, local_ids: Collection[str], environ: Mapping[str, str] = os.environ
) -> ProvidersFile:
    """The file's external models and chains, checked against the store's model ids and the environment."""
    path = Path(path)
    stop = f"invalid configuration: PROVIDERS_FILE={str(path)!r}"
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigurationError(f"{stop}: cannot be read ({error.strerror or error})") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigurationError(f"{stop}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    try:
        providers = ProvidersFile.model_validate(data or {}, context={"local_ids": frozenset(local_ids)})
    except ValidationError as error:
        raise ConfigurationError(f"{stop}: {_problems(error)}") from None
    for index, entry in enumerate(providers.models):
        if not environ.get(entry.api_key_env):
            raise ConfigurationError(
                f"{stop}: models.{index}.api_key_env: the environment variable {entry.api_key_env} that holds "
                f"{entry.model_id!r}'s key is not set"
            )
    return providers
