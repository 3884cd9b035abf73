from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from .commands import LoadModel, OptimizeMemory, UnloadModel
from .model import Model
from .ports import ModelRepository, SystemMonitor

SERVICE_NAME = "ai-model"


class ModelService:
    """Model management: which model a request means, loading, unloading, memory and health."""

    def __init__(
        self,
        repository: ModelRepository,
        monitor: SystemMonitor,
        default_model_id: str,
        default_device: str = "auto",
        idle_timeout_s: float = 0.0,
    ) -> None:
        self._repository = repository
        self._monitor = monitor
        self.default_model_id = default_model_id
        self.default_device = default_device
        self.idle_timeout_s = idle_timeout_s

    def resolve_model_id(self, model_id: str | None) -> str:
        return model_id or self.default_model_id

    async def load_model(self, command: LoadModel) -> Model:
        return await self._repository.load_model(
            self.resolve_model_id(command.model_id), command.device or self.default_device
        )

    async def unload_model(self, command: UnloadModel) -> Model:
        return await self._repository.unload_model(self.resolve_model_id(command.model_id))

    async def optimize_memory(self, command: OptimizeMemory) -> dict[str, Any]:
        return await self._monitor.optimize_memory()

    async def get_model(self, model_id: str) -> Model:
        return await self._repository.get_model(model_id)

    async def list_models(self) -> list[Model]:
        return await self._repository.list_models()

    async def loaded_models(self) -> list[Model]:
        return [model for model in await self.list_models() if model.is_loaded]

    async def health(self) -> dict[str, Any]:
        models = await self.list_models()
        loaded = [model for model in models if model.is_loaded]
        default_loaded = any(model.id == self.default_model_id for model in loaded)
        failed = any((model.metadata or {}).get("engine_error") for model in loaded)
        return {
            "status": "unhealthy" if failed else "healthy" if default_loaded else "degraded",
            "service": SERVICE_NAME,
            "default_model_id": self.default_model_id,
            "default_model_loaded": default_loaded,
            "loaded_models_count": len(loaded),
            "loaded_models": [model.to_dict() for model in loaded],
            "available_models": [model.id for model in models],
            "memory_usage": await self._monitor.memory_usage(),
        }

    async def memory_usage(self) -> dict[str, Any]:
        usage = await self._monitor.memory_usage()
        loaded = await self.loaded_models()
        return {
            **usage,
            "loaded_models_count": len(loaded),
            "loaded_models": [self._footprint(model) for model in loaded],
        }

    def _footprint(self, model: Model) -> dict[str, Any]:
        """A loaded model's memory and use; `idle_unload_at` is when MODEL_IDLE_TIMEOUT unloads it if unused."""
        metadata = model.metadata or {}
        last_used = metadata.get("last_used_at")
        unload_at = None
        if self.idle_timeout_s and last_used:
            unload_at = (datetime.fromisoformat(last_used) + timedelta(seconds=self.idle_timeout_s)).isoformat()
        return {
            "id": model.id,
            "device": model.device,
            "memory_mb": metadata.get("memory_mb"),
            "quantization": metadata.get("quantization"),
            "kv_cache_mb": metadata.get("kv_cache_mb"),
            "last_used_at": last_used,
            "idle_unload_at": unload_at,
        }

    async def system_info(self) -> dict[str, Any]:
        info = await self._monitor.system_info()
        return {**info, "loaded_models_count": len(await self.loaded_models())}
