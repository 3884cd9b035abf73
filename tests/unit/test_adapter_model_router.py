"""ModelRouter: each model id to what serves it, an external model's provider or the local engine, as
ModelService and the use case see them."""

from __future__ import annotations

import asyncio

import pytest

from adapters.model_router import ModelRouter
from domain import (
    ExternalModelError,
    GenerateText,
    GenerateTextUseCase,
    LoadModel,
    ModelNotFoundError,
    ModelService,
    PromptBuilder,
    ProviderError,
)
from tests.unit.fakes import (
    DEFAULT_MODEL_ID,
    LIMITS,
    SYSTEM_PROMPT,
    TEST_MODEL_ID,
    FakeModelRepository,
    FakeSystemMonitor,
)
from tests.unit.test_adapter_providers import MODEL_ID, PARIS, Harness, events, harness, status


@pytest.fixture
def remote() -> Harness:
    return harness(events(*PARIS), status(500), max_retries=0)


@pytest.fixture
def router(repository: FakeModelRepository, remote: Harness) -> ModelRouter:
    return ModelRouter(repository, {MODEL_ID: remote.provider})


@pytest.fixture
def models(router: ModelRouter, monitor: FakeSystemMonitor) -> ModelService:
    return ModelService(router, monitor, DEFAULT_MODEL_ID, "cpu", fallbacks={"chain": (DEFAULT_MODEL_ID, MODEL_ID)})


def test_an_external_id_goes_to_its_provider_and_any_other_to_the_engine(models, router, repository, remote) -> None:
    asyncio.run(models.load_model(LoadModel(DEFAULT_MODEL_ID)))
    use_case = GenerateTextUseCase(models, router, PromptBuilder(SYSTEM_PROMPT), LIMITS)

    external = asyncio.run(use_case(GenerateText("Capital of France?", model_id=MODEL_ID)))
    local = asyncio.run(use_case(GenerateText("Capital of France?", model_id=DEFAULT_MODEL_ID)))

    assert (external.model_id, external.text) == (MODEL_ID, "Paris it is.")
    assert local.model_id == DEFAULT_MODEL_ID
    assert len(remote.script.requests) == 1 and len(repository.generations) == 1
    assert not router.is_local(MODEL_ID) and router.is_local(DEFAULT_MODEL_ID) and router.is_local("anything-else")


def test_an_unknown_id_gets_the_engines_own_answer(models) -> None:
    with pytest.raises(ModelNotFoundError, match="'no-such-model' is not in the model store"):
        asyncio.run(models.get_model("no-such-model"))


def test_models_list_the_store_then_the_external_ones_then_the_chains_each_with_its_kind(models) -> None:
    listed = asyncio.run(models.list_models())

    assert [(model.id, model.kind) for model in listed] == [
        (DEFAULT_MODEL_ID, "local"), (TEST_MODEL_ID, "local"), (MODEL_ID, "external"), ("chain", "fallback"),
    ]


def test_loading_an_external_model_is_refused_as_an_external_model(models, repository) -> None:
    with pytest.raises(ExternalModelError, match=f"model_id {MODEL_ID!r} is an external model"):
        asyncio.run(models.load_model(LoadModel(MODEL_ID)))

    assert repository.loaded == {}


def test_health_shows_each_providers_circuit(models, router, remote) -> None:
    remote.provider.breaker.failure_threshold = 1
    use_case = GenerateTextUseCase(models, router, PromptBuilder(SYSTEM_PROMPT), LIMITS)
    asyncio.run(use_case(GenerateText("first", model_id=MODEL_ID)))
    with pytest.raises(ProviderError, match="answered 500"):
        asyncio.run(use_case(GenerateText("second", model_id=MODEL_ID)))

    health = asyncio.run(models.health())

    [provider] = health["providers"]
    assert provider["model_id"] == MODEL_ID and provider["base_url"] == "http://provider.test/v1"
    assert provider["circuit"] == "open" and provider["retry_in_s"] == 10.0
    assert health["available_models"] == [DEFAULT_MODEL_ID, TEST_MODEL_ID, MODEL_ID, "chain"]
