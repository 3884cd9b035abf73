"""Wiring for the unit tests: the real domain services over in-memory fakes."""

from __future__ import annotations

import pytest

from domain import GenerateTextUseCase, ModelService, PromptBuilder
from tests.unit.fakes import (
    DEFAULT_MODEL_ID,
    LIMITS,
    SYSTEM_PROMPT,
    TEST_MODEL_ID,
    FakeModelRepository,
    FakeSystemMonitor,
    InMemoryCatalog,
)


@pytest.fixture
def catalog() -> InMemoryCatalog:
    return InMemoryCatalog(DEFAULT_MODEL_ID, TEST_MODEL_ID)


@pytest.fixture
def repository(catalog: InMemoryCatalog) -> FakeModelRepository:
    return FakeModelRepository(catalog, devices=("cpu", "cuda:0"))


@pytest.fixture
def monitor() -> FakeSystemMonitor:
    return FakeSystemMonitor()


@pytest.fixture
def service(repository: FakeModelRepository, monitor: FakeSystemMonitor) -> ModelService:
    return ModelService(repository, monitor, default_model_id=DEFAULT_MODEL_ID, default_device="cpu")


@pytest.fixture
def generate_text(service: ModelService, repository: FakeModelRepository) -> GenerateTextUseCase:
    return GenerateTextUseCase(service, repository, PromptBuilder(SYSTEM_PROMPT), LIMITS, auto_load=True)
