"""The API's ModelRepository: each model id to what serves it, an external model's provider or the
local engine (any other id, so the engine's own answer to an unknown id stands)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from domain import ClassifyParams, Decision, Generation, GenerationParams, Model, ModelRepository, Prompt

from .providers import OpenAICompatibleProvider


class ModelRouter(ModelRepository):
    def __init__(self, local: ModelRepository, external: Mapping[str, OpenAICompatibleProvider]) -> None:
        self._local = local
        self._external = dict(external)

    def is_local(self, model_id: str) -> bool:
        return model_id not in self._external

    def _serving(self, model_id: str) -> ModelRepository:
        return self._external.get(model_id, self._local)

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        return await self._serving(model_id).load_model(model_id, device)

    async def unload_model(self, model_id: str) -> Model:
        return await self._serving(model_id).unload_model(model_id)

    def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        return self._serving(model_id).stream_text(model_id, prompt, params)

    async def generate_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> Generation:
        return await self._serving(model_id).generate_text(model_id, prompt, params)

    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams) -> Decision:
        return await self._serving(model_id).classify(model_id, prompt, params)

    async def get_model(self, model_id: str) -> Model:
        return await self._serving(model_id).get_model(model_id)

    async def list_models(self) -> list[Model]:
        """The engine's store, then the external models in the providers file's order."""
        return [*await self._local.list_models(), *(provider.describe() for provider in self._external.values())]

    async def close(self) -> None:
        for provider in self._external.values():
            await provider.close()
