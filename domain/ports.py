"""The ports the domain needs; the engine in runners/ implements them, tests implement fakes."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from .errors import GenerationError
from .generation import ClassifyParams, Decision, Generation, GenerationParams, Prompt
from .model import Model


class ModelRepository(abc.ABC):
    @abc.abstractmethod
    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        """Loads the model onto the device; loading a loaded model on the same device is a no-op."""

    @abc.abstractmethod
    async def unload_model(self, model_id: str) -> Model:
        """Frees the model's memory; unloading a model that is not loaded is a no-op."""

    @abc.abstractmethod
    def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        """Yields the text as it is generated, then the whole Generation. Raises ModelNotLoadedError,
        before yielding anything, when the model is not in memory. Closing the iterator early
        cancels the generation."""

    async def generate_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> Generation:
        async for item in self.stream_text(model_id, prompt, params):
            if isinstance(item, Generation):
                return item
        raise GenerationError(f"generation with {model_id!r} ended without a result")

    @abc.abstractmethod
    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams) -> Decision:
        """The most probable of the labels as the answer to the prompt, each label scored over its
        whole token sequence. Raises ModelNotLoadedError when the model is not in memory."""

    @abc.abstractmethod
    async def get_model(self, model_id: str) -> Model: ...

    @abc.abstractmethod
    async def list_models(self) -> list[Model]:
        """Every model in the catalog, loaded or not."""


class SystemMonitor(abc.ABC):
    @abc.abstractmethod
    async def memory_usage(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def optimize_memory(self) -> dict[str, Any]:
        """Collects garbage, clears accelerator caches, returns freed memory to the OS."""

    @abc.abstractmethod
    async def system_info(self) -> dict[str, Any]: ...
