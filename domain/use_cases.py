from __future__ import annotations

from collections.abc import Awaitable, Callable

from .commands import GenerateText, LoadModel, OptimizeMemory
from .errors import InsufficientMemoryError, ModelNotLoadedError
from .generation import Generation, GenerationLimits
from .ports import ModelRepository
from .prompt import PromptBuilder
from .services import ModelService


class GenerateTextUseCase:
    """Generates an answer to a query with its context, recovering once from each recoverable error:
    a model that is not loaded is loaded (when auto-load is on), a lack of memory is met by
    optimizing memory; anything else, or the same error twice, reaches the caller."""

    def __init__(
        self,
        models: ModelService,
        repository: ModelRepository,
        prompts: PromptBuilder,
        limits: GenerationLimits,
        auto_load: bool = True,
    ) -> None:
        self._models = models
        self._repository = repository
        self._prompts = prompts
        self._limits = limits
        self._auto_load = auto_load

    async def __call__(self, command: GenerateText) -> Generation:
        model_id = self._models.resolve_model_id(command.model_id)
        prompt = self._prompts.build(command.query, command.context)
        params = self._limits.params_for(command.max_length, command.temperature)

        async def generate() -> Generation:
            return await self._repository.generate_text(model_id, prompt, params)

        async def load_then_generate() -> Generation:
            await self._models.load_model(LoadModel(model_id))
            return await generate()

        return await self._recovering(generate, load_then_generate)

    async def _recovering(
        self,
        attempt: Callable[[], Awaitable[Generation]],
        load_then_attempt: Callable[[], Awaitable[Generation]],
    ) -> Generation:
        loaded = optimized = False
        while True:
            try:
                return await attempt()
            except ModelNotLoadedError:
                if loaded or not self._auto_load:
                    raise
                loaded, attempt = True, load_then_attempt
            except InsufficientMemoryError:
                if optimized:
                    raise
                optimized = True
                await self._models.optimize_memory(OptimizeMemory())
