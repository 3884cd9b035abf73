from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .commands import LoadModel, OptimizeMemory, UnloadModel
from .errors import ExternalModelError
from .model import EXTERNAL, FALLBACK, Model
from .ports import ModelRepository, SystemMonitor

SERVICE_NAME = "ai-model"


class ModelService:
    """Model management: which model a request means, loading, unloading, memory and health.

    `fallbacks` maps the id of a fallback chain to its members, the model ids that may serve a request
    for it, in the order they are tried (GenerateTextUseCase)."""

    def __init__(
        self,
        repository: ModelRepository,
        monitor: SystemMonitor,
        default_model_id: str,
        default_device: str = "auto",
        idle_timeout_s: float = 0.0,
        fallbacks: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._repository = repository
        self._monitor = monitor
        self.default_model_id = default_model_id
        self.default_device = default_device
        self.idle_timeout_s = idle_timeout_s
        self._fallbacks = dict(fallbacks or {})
        self._started_at = datetime.now(timezone.utc)

    def resolve_model_id(self, model_id: str | None) -> str:
        return model_id or self.default_model_id

    def members(self, model_id: str) -> tuple[str, ...]:
        """The models that may serve a request for the id, in order: a fallback chain's, or the model itself."""
        return self._fallbacks.get(model_id, (model_id,))

    def is_fallback(self, model_id: str) -> bool:
        return model_id in self._fallbacks

    async def load_model(self, command: LoadModel) -> Model:
        model_id = self.resolve_model_id(command.model_id)
        self._refuse_a_chain(model_id, "loaded")
        return await self._repository.load_model(model_id, command.device or self.default_device)

    async def unload_model(self, command: UnloadModel) -> Model:
        model_id = self.resolve_model_id(command.model_id)
        self._refuse_a_chain(model_id, "unloaded")
        return await self._repository.unload_model(model_id)

    def _refuse_a_chain(self, model_id: str, done: str) -> None:
        if self.is_fallback(model_id):
            members = ", ".join(self._fallbacks[model_id])
            raise ExternalModelError(
                f"model_id {model_id!r} is a fallback chain over {members}, not a model of this engine: it is "
                f"never {done} itself; load or unload its local members by their own ids"
            )

    async def optimize_memory(self, command: OptimizeMemory) -> dict[str, Any]:
        return await self._monitor.optimize_memory()

    async def get_model(self, model_id: str) -> Model:
        if self.is_fallback(model_id):
            return self._chain(model_id)
        return await self._repository.get_model(model_id)

    async def list_models(self) -> list[Model]:
        """The models of the engine's store and the external ones, then the fallback chains."""
        return [*await self._repository.list_models(), *map(self._chain, self._fallbacks)]

    def _chain(self, chain_id: str) -> Model:
        return Model(
            id=chain_id,
            name=chain_id,
            type=FALLBACK,
            device="none",
            is_loaded=False,
            path="",
            created_at=self._started_at,
            updated_at=self._started_at,
            metadata={"members": list(self._fallbacks[chain_id])},
            kind=FALLBACK,
        )

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
            "providers": [
                {"model_id": model.id, **(model.metadata or {})} for model in models if model.kind == EXTERNAL
            ],
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
