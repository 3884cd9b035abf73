from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import TypeVar

from .commands import Classify, CompletePrompt, GenerateText, LoadModel, OptimizeMemory
from .errors import (
    DeviceNotAvailableError,
    EngineUnavailableError,
    GenerationTimeoutError,
    InsufficientMemoryError,
    ModelNotLoadedError,
    ModelServiceError,
    ModelUnloadingError,
    OverloadedError,
    ProviderError,
    ProviderUnavailableError,
)
from .generation import ClassifyParams, Decision, Generation, GenerationLimits, GenerationParams, Prompt, TextDelta
from .ports import ModelRepository
from .prompt import PromptBuilder
from .response_cache import ResponseCache, response_key
from .services import ModelService

T = TypeVar("T")
Params = TypeVar("Params", GenerationParams, ClassifyParams)
logger = logging.getLogger(__name__)

# A member of a fallback chain that fails with one of these cannot serve the request now (busy, not
# loaded, short of memory, its engine or provider down or failing, its own time limit spent) where the
# next member may: the chain moves on. Any other error (a bad request, an unknown model, a bug) would
# fail on every member, and reaches the caller.
FALLBACK_ERRORS = (
    OverloadedError,
    ModelNotLoadedError,
    ModelUnloadingError,
    DeviceNotAvailableError,
    InsufficientMemoryError,
    EngineUnavailableError,
    ProviderError,
    ProviderUnavailableError,
    GenerationTimeoutError,
)
# Told each time a chain passes over a member: the chain's id, the member's, and why.
FallbackObserver = Callable[[str, str, ModelServiceError], None]


class GenerateTextUseCase:
    """Generates an answer to a query with its context (GenerateText), or to a prompt the caller wrote
    (CompletePrompt), recovering once from each recoverable error:
    a model that is not loaded is loaded (when auto-load is on), a lack of memory is met by
    optimizing memory; anything else, or the same error twice, reaches the caller. A stream
    recovers only before its first piece of text.

    With a response cache, a deterministic request is answered from it when it holds the answer,
    and its answer is stored there once generated. A cached answer streams as one piece of text.
    Other requests never touch the cache.

    A Classify command gets a Decision among its labels, with the same recovery.

    A request for a fallback chain (ModelService.members) goes to its members in order, each with the
    time the request has left, until one serves it: the next is tried when one fails with a
    FALLBACK_ERRORS error (after its own recovery), a stream only before its first piece. The answer
    names the member that served it; the response cache keeps it under the chain's id."""

    def __init__(
        self,
        models: ModelService,
        repository: ModelRepository,
        prompts: PromptBuilder,
        limits: GenerationLimits,
        auto_load: bool = True,
        cache: ResponseCache | None = None,
        on_fallback: FallbackObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models = models
        self._repository = repository
        self._prompts = prompts
        self._limits = limits
        self._auto_load = auto_load
        self._cache = cache
        self._on_fallback = on_fallback
        self._clock = clock

    async def __call__(self, command: GenerateText | CompletePrompt) -> Generation:
        model_id, prompt, params = self._prepare(command)
        key = self._cache_key(model_id, prompt, params)
        if (cached := await self._lookup(key)) is not None:
            return cached.from_cache()
        generation = await self._served(
            model_id, params, lambda member, limited: self._repository.generate_text(member, prompt, limited)
        )
        return await self._stored(key, generation)

    async def stream(self, command: GenerateText | CompletePrompt) -> AsyncIterator[str | Generation]:
        _, items = await self.open_stream(command)
        async with aclosing(items):
            async for item in items:
                yield item

    async def open_stream(self, command: GenerateText | CompletePrompt) -> tuple[str, AsyncIterator[str | Generation]]:
        """The id of the model that serves the stream, and the stream: the text as it is generated, then
        the whole Generation. It returns once the first item is out, since only then is it known which
        member of a fallback chain serves it."""
        model_id, prompt, params = self._prepare(command)
        key = self._cache_key(model_id, prompt, params)
        if (cached := await self._lookup(key)) is not None:
            return cached.model_id, self._replayed(cached)

        async def first_item(member: str, limited: GenerationParams) -> Opened:
            items = aiter(self._repository.stream_text(member, prompt, limited))
            return member, await anext(items), items

        member, first, rest = await self._served(model_id, params, first_item)
        return member, self._stored_stream(key, first, rest)

    @staticmethod
    async def _replayed(cached: Generation) -> AsyncIterator[str | Generation]:
        """A cached answer as a stream: its whole text as one piece, then the Generation."""
        if cached.text or cached.logprobs:
            yield TextDelta(cached.text, cached.logprobs or ())
        yield cached.from_cache()

    async def _stored_stream(
        self, key: str | None, first: str | Generation, rest: AsyncIterator[str | Generation]
    ) -> AsyncIterator[str | Generation]:
        yield await self._stored(key, first)
        async with aclosing(rest):  # a reader that leaves early ends the generation now, not when collected
            async for item in rest:
                yield await self._stored(key, item)

    async def classify(self, command: Classify) -> Decision:
        model_id, prompt, params = self._prepare_classify(command)
        return await self._served(
            model_id, params, lambda member, limited: self._repository.classify(member, prompt, limited)
        )

    def engine_work(
        self, command: GenerateText | CompletePrompt | Classify
    ) -> tuple[str, Prompt, GenerationParams | ClassifyParams] | None:
        """What the command would ask of the model, to shed load by before it runs; None for a request
        the response cache may answer, which is checked once the cache has missed, and for a fallback
        chain, whose members are refused one by one as the chain tries them."""
        if isinstance(command, Classify):
            work = self._prepare_classify(command)
        else:
            work = self._prepare(command)
            if self._cache_key(*work) is not None:
                return None
        return None if self._models.is_fallback(work[0]) else work

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

    async def _served(self, model_id: str, params: Params, operate: Callable[[str, Params], Awaitable[T]]) -> T:
        """`operate` on the model, or on each member of its fallback chain in turn with the time left,
        each recovering on its own (_recovering)."""
        if not self._models.is_fallback(model_id):
            return await self._recovering(model_id, lambda: operate(model_id, params))
        started = self._clock()
        failures: list[tuple[str, ModelServiceError]] = []
        for member in self._models.members(model_id):
            left_s = params.timeout_s - (self._clock() - started)
            if left_s <= 0:
                break
            try:
                limited = replace(params, timeout_s=left_s)
                return await self._recovering(member, lambda: operate(member, limited))
            except FALLBACK_ERRORS as error:
                failures.append((member, error))
                logger.info(
                    "fallback chain %r: %r failed (%s), trying the next member", model_id, member, error.error_type
                )
                if self._on_fallback is not None:
                    self._on_fallback(model_id, member, error)
        raise _exhausted(model_id, failures)

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


Opened = tuple[str, str | Generation, AsyncIterator[str | Generation]]  # the member, its first item, the rest


def _exhausted(chain_id: str, failures: list[tuple[str, ModelServiceError]]) -> ModelServiceError:
    """The last member's kind of error, naming every member's failure, with the soonest retry time any gave."""
    tried = "; ".join(f"{member!r}: {error.message}" for member, error in failures)
    waits = [error.retry_after_s for _, error in failures if error.retry_after_s is not None]
    last = failures[-1][1]
    message = f"fallback chain {chain_id!r}: no member could serve the request ({tried})"
    return type(last)(message, min(waits, default=None))
