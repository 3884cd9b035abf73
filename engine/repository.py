"""The ModelRepository over the BentoML model store and transformers: which models are loaded, and
each generation's way from a prompt to its text."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime

from domain import (
    CatalogEntry,
    ClassifyParams,
    Decision,
    Generation,
    GenerationError,
    GenerationParams,
    GenerationTimeoutError,
    InsufficientMemoryError,
    InvalidRequestError,
    Model,
    ModelCatalog,
    ModelNotLoadedError,
    ModelRepository,
    ModelUnloadingError,
    OverloadedError,
    Prompt,
    TextDelta,
    TokenLogprob,
)
from domain.generation import REQUEST_TIMEOUT
from metrics import EVICTIONS, GENERATION_SECONDS, LOADED_MODELS

from .core.detokenizer import IncrementalDecoder
from .core.grammar import KIND_NAMES, shown
from .core.label_scoring import LabelScoring, ScoringRequest
from .core.loop_bridge import EventStream, off_loop
from .core.queue_board import NO_TICKET, QueueBoard
from .core.scheduler import QueueFull
from .core.sequence import (
    FinishEvent,
    FinishReason,
    SamplingRequest,
    ScoreEvent,
    Sequence,
    TokenEvent,
    TokenLogprobs,
)
from .core.service_rate import PastDeadline
from .layers.tuned_linear import Choice
from .models import quantization
from .models.cpu_threads import StepThreads
from .models.devices import resolve_device
from .models.loader import BatchingOptions, LoadedModel, ModelLoader, now
from .models.memory import MemoryLimits, release_freed_memory

logger = logging.getLogger(__name__)


class TransformersModelRepository(ModelRepository):
    """Loads store models with transformers (models/loader.py); each loaded model gets a paged KV
    cache and an engine core whose thread runs every generation on it.

    Loads run on `executor` so the engine's event loop keeps serving; loads and unloads of one
    model are serialized by a per-model lock, so two concurrent loads load it once.
    """

    def __init__(
        self,
        catalog: ModelCatalog,
        executor: Executor,
        memory_limits: MemoryLimits,
        dtype: str = "auto",
        batching: BatchingOptions = BatchingOptions(),
        quantization_setting: str = quantization.NONE,
        linear_kernels: str = Choice.TUNED.value,
        queue_board: QueueBoard | None = None,
        step_threads: StepThreads | None = None,
    ) -> None:
        self._catalog = catalog
        self._executor = executor
        self._loader = ModelLoader(
            memory_limits, dtype, quantization_setting, batching, Choice(linear_kernels), queue_board=queue_board,
            step_threads=step_threads,
        )
        self._loaded: dict[str, LoadedModel] = {}
        self._changed_at: dict[str, datetime] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._active: Counter[str] = Counter()

    # The async port, for the engine's event loop.

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        return await off_loop(self._executor, lambda: self.load_blocking(model_id, device))

    async def unload_model(self, model_id: str) -> Model:
        return await off_loop(self._executor, lambda: self.unload_blocking(model_id))

    async def stream_text(
        self, model_id: str, prompt: Prompt, params: GenerationParams, ticket: int = NO_TICKET
    ) -> AsyncIterator[str | Generation]:
        """`ticket`: the request's reservation on the queue board, which its admission clears."""
        loaded = self._serving(model_id, params.priority)
        started = time.perf_counter()
        prompt_ids = await off_loop(self._executor, lambda: loaded.encode(prompt))
        loaded.check_fits(len(prompt_ids), params.max_new_tokens)
        grammar = None
        if params.guided is not None:  # compiled once per distinct grammar, off the loop: a schema can take a while
            grammar = (await off_loop(self._executor, lambda: loaded.grammars.compile(params.guided))).matcher
        deadline = time.monotonic() + params.timeout_s
        request = SamplingRequest(
            prompt_ids,
            params.max_new_tokens,
            params.temperature,
            deadline,
            top_p=params.top_p,
            seed=params.seed,
            min_new_tokens=params.min_new_tokens,
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            priority=params.priority,
            grammar=grammar,
            ticket=ticket,
        )
        events = EventStream()
        decoder = IncrementalDecoder(loaded.tokenizer, params.stop)
        logprobs: list[TokenLogprob] = []  # every token's, for the whole Generation
        unsent = 0  # how many of them no delta has carried yet
        with self._in_use(loaded):
            sequence = self._submit(loaded, request, events, params.timeout_by)
            finish, first_token_at = None, None
            try:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        first_token_at = first_token_at or time.perf_counter()
                        if event.logprobs is not None:
                            logprobs.append(self._token_logprob(loaded, event.token_id, event.logprobs))
                        if delta := decoder.push(event.token_id):
                            yield TextDelta(delta, tuple(logprobs[unsent:]))
                            unsent = len(logprobs)
                        if decoder.stopped:  # a stop string came: the answer is complete, the sequence leaves its batch
                            sequence.cancel()
                            finish = FinishEvent(
                                FinishReason.STOP, sequence.prompt_length, len(decoder.token_ids), sequence.cached_prompt_tokens
                            )
                            break
                    elif isinstance(event, FinishEvent):
                        finish = event
            finally:
                if finish is None:
                    sequence.cancel()  # the caller left: its batch slot frees at the next step
        held_back = decoder.flush()  # text that could have begun a stop string, which never came
        if held_back or unsent < len(logprobs):
            yield TextDelta(held_back, tuple(logprobs[unsent:]))
        generation = self._result(loaded, params, finish, decoder, started, first_token_at)
        yield replace(generation, logprobs=tuple(logprobs)) if params.logprobs is not None else generation

    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams, ticket: int = NO_TICKET) -> Decision:
        """Scores each label's tokens after the prompt (core/label_scoring.py): one scoring request
        reads every label's first token off the prompt's last logits; then labels of more tokens are
        scored by requests whose prompt's first part comes from the prefix cache the first one filled."""
        loaded = self._serving(model_id, params.priority)
        started = time.perf_counter()
        prompt_ids, labels = await off_loop(
            self._executor, lambda: (loaded.encode(prompt), loaded.encode_labels(params.labels, params.field))
        )
        scoring = LabelScoring(prompt_ids, labels)
        loaded.check_fits(scoring.longest_prompt, 0)
        deadline = time.monotonic() + params.timeout_s
        with self._in_use(loaded):
            first, finish = await self._score(loaded, scoring.first, deadline, params, ticket)
            rest = await asyncio.gather(
                *(self._score(loaded, request, deadline, params) for request in scoring.rest)
            )
        totals = scoring.totals(first, [scores for scores, _ in rest])
        weights = [math.exp(total - max(totals)) for total in totals]
        probabilities = [weight / sum(weights) for weight in weights]
        best = max(range(len(labels)), key=lambda index: totals[index])
        return Decision(
            label=params.labels[best],
            probabilities=dict(zip(params.labels, probabilities)),
            model_id=loaded.model_id,
            prompt_tokens=len(prompt_ids),
            cached_prompt_tokens=finish.cached_prompt_tokens,
            decision_time_s=round(time.perf_counter() - started, 4),
        )

    async def _score(
        self,
        loaded: LoadedModel,
        scoring: ScoringRequest,
        deadline: float,
        params: ClassifyParams,
        ticket: int = NO_TICKET,
    ) -> tuple[tuple[tuple[float, ...], ...], FinishEvent]:
        """The log probabilities the scoring request reads at each of its scored positions."""
        request = SamplingRequest(
            scoring.prompt_ids, 0, 0.0, deadline, priority=params.priority, scored=scoring.scored, ticket=ticket
        )
        events = EventStream()
        sequence = self._submit(loaded, request, events, params.timeout_by)
        scores, finish = None, None
        try:
            async for event in events:
                if isinstance(event, ScoreEvent):
                    scores = event.logprobs
                elif isinstance(event, FinishEvent):
                    finish = event
        finally:
            if finish is None:
                sequence.cancel()
        self._raise_if_failed(loaded, finish, params)
        return scores, finish

    async def get_model(self, model_id: str) -> Model:
        return self._describe(self._catalog.get(model_id))

    async def list_models(self) -> list[Model]:
        return [self._describe(entry) for entry in self._catalog.entries().values()]

    # The blocking operations, run on the executor's threads.

    def load_blocking(self, model_id: str, device: str = "auto") -> Model:
        entry = self._catalog.get(model_id)
        target = resolve_device(device)
        with self._lock_for(model_id):
            current = self._loaded.get(model_id)
            if current is not None and (device == "auto" or current.device == target):
                return self._describe(entry)
            if current is not None:
                self._drop(model_id)
            self._loaded[model_id] = self._load_making_room(entry, target)
            self._changed_at[model_id] = now()
            LOADED_MODELS.set(len(self._loaded))
        return self._describe(entry)

    def _load_making_room(self, entry: CatalogEntry, device: str) -> LoadedModel:
        """A load refused for memory unloads idle models, least recently used first, until it fits or
        none is left, then is tried once more."""
        try:
            return self._loader.load(entry, device)
        except InsufficientMemoryError as refused:
            unloaded = self.unload_idle(
                until=lambda: self._loader.fits(entry, device),
                keep={entry.model_id},
                reason="make_room",
                why=entry.model_id,
            )
            if not unloaded:
                raise InsufficientMemoryError(f"{refused}; and no idle model could be unloaded to make room") from None
        try:
            return self._loader.load(entry, device)
        except InsufficientMemoryError as again:
            tried = f"unloading the idle {', '.join(unloaded)} first was not enough"
            raise InsufficientMemoryError(f"{again}; {tried}") from None

    def unload_idle(self, until: Callable[[], bool], keep: set[str], reason: str, why: str) -> list[str]:
        """Unloads idle models (no request in flight), least recently used first and none of `keep`,
        until `until()` holds; the models it unloaded. `reason` labels the metric, `why` the log."""
        unloaded: list[str] = []
        for model_id in self.idle_models():
            if until():
                break
            if model_id not in keep and self.unload_if_idle(model_id):
                EVICTIONS.labels(reason=reason).inc()
                logger.warning("unloaded idle model %s: %s", model_id, why)
                unloaded.append(model_id)
        return unloaded

    def unload_blocking(self, model_id: str) -> Model:
        entry = self._catalog.get(model_id)
        with self._lock_for(model_id):
            if model_id in self._loaded:
                self._drop(model_id)
        return self._describe(entry)

    def idle_models(self) -> list[str]:
        """Loaded models that no generation is using, least recently used first."""
        with self._locks_guard:
            idle = [loaded for model_id, loaded in self._loaded.items() if self._active[model_id] == 0]
        return [loaded.model_id for loaded in sorted(idle, key=lambda loaded: loaded.last_used_at)]

    def unload_if_idle(self, model_id: str) -> bool:
        with self._lock_for(model_id):
            with self._locks_guard:
                if model_id not in self._loaded or self._active[model_id]:
                    return False
            self._drop(model_id)
            return True

    def busy(self) -> bool:
        """Whether any generation is queued or running."""
        with self._locks_guard:
            return any(self._active.values())

    def failures(self) -> dict[str, str]:
        """Loaded models whose engine core died, and why: they serve nothing until reloaded."""
        return {model_id: loaded.core.failure for model_id, loaded in list(self._loaded.items()) if loaded.core.failure}

    def loaded(self, model_id: str) -> LoadedModel | None:
        return self._loaded.get(model_id)

    @contextmanager
    def _in_use(self, loaded: LoadedModel) -> Iterator[None]:
        """Counts a generation on the model while it runs: the watchdog never unloads a model in use."""
        with self._locks_guard:
            self._active[loaded.model_id] += 1
        try:
            yield
        finally:
            with self._locks_guard:
                self._active[loaded.model_id] -= 1
            loaded.last_used_at = now()

    def _serving(self, model_id: str, priority: int) -> LoadedModel:
        """The loaded model, unless it is not loaded or its queue is full for this priority: refused at
        once, before the tokenizer's thread hop."""
        loaded = self._loaded.get(model_id)
        if loaded is None:
            self._catalog.get(model_id)  # an unknown id is "not found", not "not loaded"
            raise ModelNotLoadedError.for_id(model_id)
        if loaded.core.scheduler.refuses(priority):
            raise self._overloaded(loaded)
        return loaded

    def _submit(self, loaded: LoadedModel, request: SamplingRequest, events: EventStream, timeout_by: str) -> Sequence:
        try:  # others may have filled the queue while this prompt was tokenized
            return loaded.core.submit(request, events.sink)
        except QueueFull:
            raise self._overloaded(loaded) from None
        except PastDeadline as late:
            by_own_timeout = timeout_by == REQUEST_TIMEOUT
            raise OverloadedError.past_deadline(loaded.model_id, late.expected_s, late.allowed_s, by_own_timeout) from None

    @staticmethod
    def _token_logprob(loaded: LoadedModel, token_id: int, logprobs: TokenLogprobs) -> TokenLogprob:
        top = tuple(TokenLogprob(*loaded.token_texts(alternative), logprob) for alternative, logprob in logprobs.top)
        return TokenLogprob(*loaded.token_texts(token_id), logprobs.logprob, top)

    def _overloaded(self, loaded: LoadedModel) -> OverloadedError:
        scheduler = loaded.core.scheduler
        return OverloadedError.queue_full(loaded.model_id, len(scheduler.waiting), scheduler.max_queue_size)

    @staticmethod
    def _raise_if_failed(loaded: LoadedModel, finish: FinishEvent, params: GenerationParams | ClassifyParams) -> None:
        if finish.reason is FinishReason.TIMEOUT:
            if params.timeout_by == REQUEST_TIMEOUT:
                raise GenerationTimeoutError(
                    f"generation passed the request's timeout of {params.timeout_s:g}s and was stopped; "
                    f"ask for fewer tokens (max_length) or allow a longer timeout"
                )
            raise GenerationTimeoutError(
                f"generation passed MAX_GENERATION_TIME={params.timeout_s:g}s and was stopped; "
                f"ask for fewer tokens (max_length) or raise MAX_GENERATION_TIME"
            )
        if finish.reason is FinishReason.UNLOADED:
            raise ModelUnloadingError(f"model {loaded.model_id!r} was unloaded before this generation finished")
        if finish.reason is FinishReason.REFUSED:
            scheduler = loaded.core.scheduler
            raise OverloadedError(
                f"the queue for {loaded.model_id!r} is full (MAX_QUEUE_SIZE={scheduler.max_queue_size}) and "
                f"{finish.detail}; retry shortly"
            )
        if not finish.reason.completed:
            raise GenerationError(f"generation with {loaded.model_id!r} failed: {finish.reason.value} {finish.detail}".strip())

    @staticmethod
    def _result(
        loaded: LoadedModel,
        params: GenerationParams,
        finish: FinishEvent,
        decoder: IncrementalDecoder,
        started: float,
        first_token_at: float | None,
    ) -> Generation:
        if finish.reason is FinishReason.UNWRITABLE and (guided := params.guided) is not None:
            # The grammar wants bytes no token of this vocabulary holds (a character its BPE never saw):
            # no model output can satisfy it, so the request, not the server, is at fault.
            raise InvalidRequestError(
                f"{guided.field}: model {loaded.model_id!r}'s tokenizer cannot write the text this "
                f"{KIND_NAMES[guided.kind]} requires ({finish.detail}), got {shown(guided.value)}"
            )
        TransformersModelRepository._raise_if_failed(loaded, finish, params)
        generation_time = time.perf_counter() - started
        GENERATION_SECONDS.labels(model=loaded.model_id).observe(generation_time)
        return Generation(
            text=decoder.text(),
            model_id=loaded.model_id,
            finish_reason=finish.reason.value,
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            generation_time_s=round(generation_time, 4),
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            time_to_first_token_s=round((first_token_at or time.perf_counter()) - started, 4),
            cached_prompt_tokens=finish.cached_prompt_tokens,
        )

    def _lock_for(self, model_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(model_id, threading.Lock())

    def _drop(self, model_id: str) -> None:
        loaded = self._loaded.pop(model_id)
        self._changed_at[model_id] = now()
        LOADED_MODELS.set(len(self._loaded))
        loaded.core.stop(FinishReason.UNLOADED)
        device = loaded.device
        del loaded  # the last reference to the weights: the memory can go
        report = release_freed_memory()
        logger.info("unloaded %s from %s, freed %.0f MB", model_id, device, report["freed_mb"])

    def _describe(self, entry: CatalogEntry) -> Model:
        loaded = self._loaded.get(entry.model_id)
        metadata = dict(entry.metadata, version=entry.version)
        if loaded is not None:
            metadata.update(
                loaded_dtype=str(loaded.dtype).replace("torch.", ""),
                quantization=loaded.quantization,
                load_time_s=loaded.load_time_s,
                memory_mb=round(loaded.memory_bytes / 2**20, 1),
                loaded_at=loaded.loaded_at.isoformat(),
                last_used_at=loaded.last_used_at.isoformat(),
                kv_cache_mb=round(loaded.cache.size_bytes / 2**20, 1),
                batch=loaded.core.scheduler.load,
            )
            if loaded.linear_kernels is not None:
                metadata["linear_kernels"] = loaded.linear_kernels.describe()
            if loaded.core.failure:
                metadata["engine_error"] = loaded.core.failure
        return Model(
            id=entry.model_id,
            name=f"{entry.model_id}:{entry.version}",
            type=entry.type,
            device=loaded.device if loaded else "none",
            is_loaded=loaded is not None,
            path=entry.path,
            created_at=entry.created_at,
            updated_at=self._changed_at.get(entry.model_id, entry.created_at),
            metadata=metadata,
        )
