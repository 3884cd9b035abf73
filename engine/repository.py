"""The ModelRepository over the BentoML model store and transformers: which models are loaded, and
each generation's way from a prompt to its text."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from datetime import datetime

from domain import (
    CatalogEntry,
    Generation,
    GenerationError,
    GenerationParams,
    GenerationTimeoutError,
    Model,
    ModelCatalog,
    ModelNotLoadedError,
    ModelRepository,
    ModelUnloadingError,
    OverloadedError,
    Prompt,
)
from metrics import GENERATION_SECONDS, LOADED_MODELS

from .core.detokenizer import IncrementalDecoder
from .core.loop_bridge import EventStream, off_loop
from .core.scheduler import QueueFull
from .core.sequence import FinishEvent, FinishReason, SamplingRequest, TokenEvent
from .layers.tuned_linear import Choice
from .models import quantization
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
    ) -> None:
        self._catalog = catalog
        self._executor = executor
        self._loader = ModelLoader(memory_limits, dtype, quantization_setting, batching, Choice(linear_kernels))
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

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        loaded = self._loaded.get(model_id)
        if loaded is None:
            self._catalog.get(model_id)  # an unknown id is "not found", not "not loaded"
            raise ModelNotLoadedError.for_id(model_id)
        started = time.perf_counter()
        if loaded.core.scheduler.queue_full:  # refuse at once, before the tokenizer's thread hop
            raise self._overloaded(loaded)
        prompt_ids = await off_loop(self._executor, lambda: loaded.encode(prompt))
        loaded.check_fits(len(prompt_ids), params.max_new_tokens)
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
        )
        events = EventStream()
        decoder = IncrementalDecoder(loaded.tokenizer, params.stop)
        with self._in_use(loaded):
            try:  # others may have filled the queue while this prompt was tokenized
                sequence = loaded.core.submit(request, events.sink)
            except QueueFull:
                raise self._overloaded(loaded) from None
            finish, first_token_at = None, None
            try:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        first_token_at = first_token_at or time.perf_counter()
                        if delta := decoder.push(event.token_id):
                            yield delta
                        if decoder.stopped:  # a stop string came: the answer is complete, the sequence leaves its batch
                            sequence.cancel()
                            finish = FinishEvent(
                                FinishReason.STOP, sequence.prompt_length, len(decoder.token_ids), sequence.cached_prompt_tokens
                            )
                            break
                    else:
                        finish = event
            finally:
                if finish is None:
                    sequence.cancel()  # the caller left: its batch slot frees at the next step
        if held_back := decoder.flush():  # text that could have begun a stop string, which never came
            yield held_back
        yield self._result(loaded, params, finish, decoder, started, first_token_at)

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
            self._loaded[model_id] = self._loader.load(entry, target)
            self._changed_at[model_id] = now()
            LOADED_MODELS.set(len(self._loaded))
        return self._describe(entry)

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

    def _overloaded(self, loaded: LoadedModel) -> OverloadedError:
        scheduler = loaded.core.scheduler
        return OverloadedError(
            f"{len(scheduler.waiting)} requests are already queued for {loaded.model_id!r} (MAX_QUEUE_SIZE="
            f"{scheduler.max_queue_size}) behind a full batch; retry shortly"
        )

    @staticmethod
    def _result(
        loaded: LoadedModel,
        params: GenerationParams,
        finish: FinishEvent,
        decoder: IncrementalDecoder,
        started: float,
        first_token_at: float | None,
    ) -> Generation:
        if finish.reason is FinishReason.TIMEOUT:
            raise GenerationTimeoutError(
                f"generation passed MAX_GENERATION_TIME={params.timeout_s:g}s and was stopped; "
                f"ask for fewer tokens (max_length) or raise MAX_GENERATION_TIME"
            )
        if finish.reason is FinishReason.UNLOADED:
            raise ModelUnloadingError(f"model {loaded.model_id!r} was unloaded before this generation finished")
        if not finish.reason.completed:
            raise GenerationError(f"generation with {loaded.model_id!r} failed: {finish.reason.value} {finish.detail}".strip())
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
