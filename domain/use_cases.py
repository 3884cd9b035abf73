from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from .commands import Classify, CompletePrompt, GenerateText, LoadModel, OptimizeMemory
from .errors import InsufficientMemoryError, ModelNotLoadedError
from .generation import ClassifyParams, Decision, Generation, GenerationLimits, GenerationParams, Prompt, TextDelta
from .ports import ModelRepository
from .prompt import PromptBuilder
from .response_cache import ResponseCache, response_key
from .services import ModelService

T = TypeVar("T")


class GenerateTextUseCase:
    """Generates an answer to a query with its context (GenerateText), or to a prompt the caller wrote
    (CompletePrompt), recovering once from each recoverable error:
    a model that is not loaded is loaded (when auto-load is on), a lack of memory is met by
    optimizing memory; anything else, or the same error twice, reaches the caller. A stream
    recovers only before its first piece of text.

    With a response cache, a deterministic request is answered from it when it holds the answer,
    and its answer is stored there once generated. A cached answer streams as one piece of text.
    Other requests never touch the cache.

    A Classify command gets a Decision among its labels, with the same recovery."""

    def __init__(
        self,
        models: ModelService,
        repository: ModelRepository,
        prompts: PromptBuilder,
        limits: GenerationLimits,
        auto_load: bool = True,
        cache: ResponseCache | None = None,
    ) -> None:
        self._models = models
        self._repository = repository
        self._prompts = prompts
        self._limits = limits
        self._auto_load = auto_load
        self._cache = cache

    async def __call__(self, command: GenerateText | CompletePrompt) -> Generation:
        model_id, prompt, params = self._prepare(command)
        key = self._cache_key(model_id, prompt, params)
        if (cached := await self._lookup(key)) is not None:
            return cached.from_cache()
        generation = await self._recovering(model_id, lambda: self._repository.generate_text(model_id, prompt, params))
        return await self._stored(key, generation)

    async def stream(self, command: GenerateText | CompletePrompt) -> AsyncIterator[str | Generation]:
        model_id, prompt, params = self._prepare(command)
        key = self._cache_key(model_id, prompt, params)
        if (cached := await self._lookup(key)) is not None:
            if cached.text or cached.logprobs:
                yield TextDelta(cached.text, cached.logprobs or ())
            yield cached.from_cache()
            return

        async def first_item() -> tuple[str | Generation, AsyncIterator[str | Generation]]:
            items = aiter(self._repository.stream_text(model_id, prompt, params))
            return await anext(items), items

        first, rest = await self._recovering(model_id, first_item)
        yield await self._stored(key, first)
        async for item in rest:
            yield await self._stored(key, item)

    async def classify(self, command: Classify) -> Decision:
        model_id, prompt, params = self._prepare_classify(command)
        return await self._recovering(model_id, lambda: self._repository.classify(model_id, prompt, params))

    def engine_work(
        self, command: GenerateText | CompletePrompt | Classify
    ) -> tuple[str, Prompt, GenerationParams | ClassifyParams] | None:
        """What the command would ask of the model, to shed load by before it runs; None for a request
        the response cache may answer, which is checked once the cache has missed."""
        if isinstance(command, Classify):
            return self._prepare_classify(command)
        model_id, prompt, params = self._prepare(command)
        return None if self._cache_key(model_id, prompt, params) is not None else (model_id, prompt, params)

    def _prepare_classify(self, command: Classify) -> tuple[str, Prompt, ClassifyParams]:
        params = self._limits.classify_params(command.labels, command.timeout, command.priority, command.labels_field)
        prompt = self._prompts.build(command.query, command.context)
        return self._models.resolve_model_id(command.model_id), prompt, params

    def _cache_key(self, model_id: str, prompt: Prompt, params: GenerationParams) -> str | None:
        if self._cache is None or not params.deterministic:
            return None
        return response_key(model_id, prompt, params)

    async def _lookup(self, key: str | None) -> Generation | None:
        return None if key is None else await self._cache.get(key)

    async def _stored(self, key: str | None, item: T) -> T:
        """The item; a final Generation is also stored in the cache under the key."""
        if key is not None and isinstance(item, Generation):
            await self._cache.put(key, item)
        return item

    def _prepare(self, command: GenerateText | CompletePrompt) -> tuple[str, Prompt, GenerationParams]:
        if isinstance(command, CompletePrompt):
            prompt = command.prompt
        else:
            prompt = self._prompts.build(command.query, command.context)
        params = self._limits.params_for(
            command.max_length,
            command.temperature,
            command.timeout,
            top_p=command.top_p,
            stop=command.stop,
            seed=command.seed,
            min_tokens=command.min_tokens,
            ignore_eos=command.ignore_eos,
            logprobs=command.logprobs,
            priority=command.priority,
            guided=command.guided,
        )
        return self._models.resolve_model_id(command.model_id), prompt, params

    async def _recovering(self, model_id: str, operation: Callable[[], Awaitable[T]]) -> T:
        async def load_then_operate() -> T:
            await self._models.load_model(LoadModel(model_id))
            return await operation()

        attempt = operation
        loaded = optimized = False
        while True:
            try:
                return await attempt()
            except ModelNotLoadedError:
                if loaded or not self._auto_load:
                    raise
                loaded, attempt = True, load_then_operate
            except InsufficientMemoryError:
                if optimized:
                    raise
                optimized = True
                await self._models.optimize_memory(OptimizeMemory())
