"""ModelService: which model and device a command means, loading, unloading, health and memory reports."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from domain import LoadModel, ModelNotFoundError, ModelService, OptimizeMemory, UnloadModel
from tests.unit.fakes import (
    DEFAULT_MODEL_ID,
    LAST_USED,
    TEST_MODEL_ID,
    FakeModelRepository,
    FakeSystemMonitor,
    InMemoryCatalog,
)


def test_load_model_on_cpu_gives_a_loaded_model_on_cpu(service: ModelService) -> None:
    """Loading `test-model` on `cpu` gives a loaded model on the CPU."""
    model = asyncio.run(service.load_model(LoadModel("test-model", "cpu")))

    assert model.is_loaded is True
    assert model.device == "cpu"
    assert model.id == "test-model"


def test_loaded_model_is_kept_in_the_repository(service: ModelService, repository: FakeModelRepository) -> None:
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, "cpu")))

    assert repository.loaded == {TEST_MODEL_ID: "cpu"}


def test_loading_an_unknown_model_id_is_model_not_found(service: ModelService) -> None:
    with pytest.raises(ModelNotFoundError) as raised:
        asyncio.run(service.load_model(LoadModel("no-such-model", "cpu")))

    assert raised.value.error_type == "model_not_found"


def test_model_not_found_lists_the_available_ids_and_how_to_import(service: ModelService) -> None:
    with pytest.raises(ModelNotFoundError) as raised:
        asyncio.run(service.load_model(LoadModel("no-such-model")))

    message = str(raised.value)
    assert "'no-such-model'" in message
    assert f"available: {DEFAULT_MODEL_ID}, {TEST_MODEL_ID}" in message
    assert "scripts/import_model.py" in message


def test_a_failed_load_of_an_unknown_model_loads_nothing(
    service: ModelService, repository: FakeModelRepository
) -> None:
    with pytest.raises(ModelNotFoundError):
        asyncio.run(service.load_model(LoadModel("no-such-model")))

    assert repository.loaded == {}


@pytest.mark.parametrize("model_id", [None, ""])
def test_load_without_a_model_id_loads_the_default_model(
    service: ModelService, repository: FakeModelRepository, model_id: str | None
) -> None:
    model = asyncio.run(service.load_model(LoadModel(model_id, "cpu")))

    assert model.id == DEFAULT_MODEL_ID
    assert repository.is_loaded(DEFAULT_MODEL_ID)
    assert not repository.is_loaded(TEST_MODEL_ID)


@pytest.mark.parametrize("model_id, expected", [(None, DEFAULT_MODEL_ID), ("", DEFAULT_MODEL_ID), ("x", "x")])
def test_resolve_model_id_falls_back_to_the_default(service: ModelService, model_id: str | None, expected: str) -> None:
    assert service.resolve_model_id(model_id) == expected


@pytest.mark.parametrize("device", [None, ""])
def test_load_without_a_device_uses_the_default_device(repository: FakeModelRepository, device: str | None) -> None:
    service = ModelService(repository, FakeSystemMonitor(), DEFAULT_MODEL_ID, default_device="cuda:0")

    model = asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, device)))

    assert model.device == "cuda:0"
    assert repository.loaded == {TEST_MODEL_ID: "cuda:0"}


def test_an_explicit_device_overrides_the_default_device(repository: FakeModelRepository) -> None:
    service = ModelService(repository, FakeSystemMonitor(), DEFAULT_MODEL_ID, default_device="cuda:0")

    model = asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, "cpu")))

    assert model.device == "cpu"


def test_the_default_device_is_auto_when_none_is_configured(repository: FakeModelRepository) -> None:
    service = ModelService(repository, FakeSystemMonitor(), DEFAULT_MODEL_ID)

    assert service.default_device == "auto"
    model = asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID)))
    assert model.device == "cpu"  # the fake resolves "auto" to its first device


def test_unload_model_leaves_the_model_unloaded(service: ModelService, repository: FakeModelRepository) -> None:
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, "cpu")))

    model = asyncio.run(service.unload_model(UnloadModel(TEST_MODEL_ID)))

    assert model.is_loaded is False
    assert repository.loaded == {}


def test_unload_without_a_model_id_unloads_the_default_model(
    service: ModelService, repository: FakeModelRepository
) -> None:
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID, "cpu")))
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, "cpu")))

    asyncio.run(service.unload_model(UnloadModel()))

    assert repository.loaded == {TEST_MODEL_ID: "cpu"}


def test_optimize_memory_runs_the_monitor_and_returns_its_report(
    service: ModelService, monitor: FakeSystemMonitor
) -> None:
    report = asyncio.run(service.optimize_memory(OptimizeMemory()))

    assert monitor.optimizations == 1
    assert report["freed_mb"] == 256.0


def test_loaded_models_lists_only_the_loaded_ones(service: ModelService) -> None:
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID, "cpu")))

    assert [model.id for model in asyncio.run(service.loaded_models())] == [TEST_MODEL_ID]
    assert [model.id for model in asyncio.run(service.list_models())] == [DEFAULT_MODEL_ID, TEST_MODEL_ID]


class TestHealth:
    def test_is_healthy_when_the_default_model_is_loaded(self, service: ModelService) -> None:
        asyncio.run(service.load_model(LoadModel()))

        health = asyncio.run(service.health())

        assert health["status"] == "healthy"
        assert health["default_model_loaded"] is True

    def test_is_degraded_when_the_default_model_is_not_loaded(self, service: ModelService) -> None:
        asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID)))

        health = asyncio.run(service.health())

        assert health["status"] == "degraded"
        assert health["default_model_loaded"] is False

    def test_is_unhealthy_when_a_loaded_model_s_engine_failed(
        self, service: ModelService, repository: FakeModelRepository
    ) -> None:
        asyncio.run(service.load_model(LoadModel()))
        repository.engine_errors[DEFAULT_MODEL_ID] = "AcceleratorError: CUDA error: device-side assert triggered"

        health = asyncio.run(service.health())

        assert health["status"] == "unhealthy"
        assert "device-side assert" in health["loaded_models"][0]["metadata"]["engine_error"]

    def test_has_the_documented_shape(self, service: ModelService, monitor: FakeSystemMonitor) -> None:
        asyncio.run(service.load_model(LoadModel()))
        asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID)))

        health = asyncio.run(service.health())

        assert health["service"] == "ai-model"
        assert health["default_model_id"] == DEFAULT_MODEL_ID
        assert health["loaded_models_count"] == 2
        assert [model["id"] for model in health["loaded_models"]] == [DEFAULT_MODEL_ID, TEST_MODEL_ID]
        assert health["available_models"] == [DEFAULT_MODEL_ID, TEST_MODEL_ID]
        assert health["memory_usage"] == asyncio.run(monitor.memory_usage())

    def test_counts_no_models_when_none_is_loaded(self, service: ModelService) -> None:
        health = asyncio.run(service.health())

        assert health["loaded_models_count"] == 0
        assert health["loaded_models"] == []

    def test_with_an_empty_catalog_is_degraded(self, monitor: FakeSystemMonitor) -> None:
        service = ModelService(FakeModelRepository(InMemoryCatalog()), monitor, DEFAULT_MODEL_ID)

        health = asyncio.run(service.health())

        assert health["status"] == "degraded"
        assert health["available_models"] == []


def test_memory_usage_adds_the_loaded_models_count_to_the_monitors_figures(service: ModelService) -> None:
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID)))

    usage = asyncio.run(service.memory_usage())

    assert {key: usage[key] for key in ("rss_mb", "system_percent", "loaded_models_count")} == {
        "rss_mb": 512.0,
        "system_percent": 42.0,
        "loaded_models_count": 1,
    }
    assert [model["id"] for model in usage["loaded_models"]] == [TEST_MODEL_ID]


def test_system_info_adds_the_loaded_models_count_to_the_monitors_figures(service: ModelService) -> None:
    asyncio.run(service.load_model(LoadModel(TEST_MODEL_ID)))
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID)))

    info = asyncio.run(service.system_info())

    assert info == {"platform": "fake", "cpu_count": 4, "loaded_models_count": 2}


def test_memory_usage_shows_each_loaded_model_and_when_idleness_unloads_it(repository, monitor) -> None:
    service = ModelService(repository, monitor, default_model_id=DEFAULT_MODEL_ID, idle_timeout_s=60)
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID)))

    (model,) = asyncio.run(service.memory_usage())["loaded_models"]

    assert model["id"] == DEFAULT_MODEL_ID and model["device"] == "cpu"
    assert model["last_used_at"] == LAST_USED.isoformat()
    assert model["idle_unload_at"] == (LAST_USED + timedelta(seconds=60)).isoformat()
