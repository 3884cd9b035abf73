"""The ModelRepository over the BentoML model store and transformers (the spec's OptimizedModelRepository)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domain import (
    CatalogEntry,
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
)
from metrics import GENERATION_SECONDS, LOAD_SECONDS, LOADED_MODELS

from . import fast_linear, paged_attention, quantization
from .devices import dtype_for, resolve_device
from .generation import (
    EventStream,
    IncrementalDecoder,
    LoadedModel,
    check_context_window,
    encode_prompt,
    eos_token_ids,
)
from .kv_cache import BLOCK_SIZE, PagedKVCache
from .memory import MemoryLimits, check_room_for, estimate_footprint, release_freed_memory, weights_at_load
from .scheduler import BatchScheduler, FinishEvent, SamplingRequest, TokenEvent

logger = logging.getLogger(__name__)
T = TypeVar("T")


UNLOADED = "the model was unloaded"


def on_a_thread_of_its_own(work: Callable[[], T]) -> T:
    """Runs `work` on a new thread that ends with it, and waits. torch's OpenMP keeps a team of worker
    threads for every thread that ran parallel work, for as long as that thread lives. Once a process
    holds more OpenMP threads than cores, libgomp stops spinning at its barriers, and every parallel
    region waits for futex wake-ups. A load on a long-lived executor thread left its team behind and
    made every batch step after it slower: 30 decode steps at one row took 1.69 s instead of 0.99 s."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as error:  # noqa: BLE001: handed to the waiting caller
            done.set_exception(error)

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    thread.join()
    return done.result()


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    prefill_budget: int = 512
    batch_wait_s: float = 0.0
    kv_cache_bytes: int = 1 << 30
    max_queue_size: int = 256


class TransformersModelRepository(ModelRepository):
    """Loads store models with transformers; each loaded model gets a paged KV cache and a batch
    scheduler thread that runs every generation on it.

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
    ) -> None:
        self._catalog = catalog
        self._executor = executor
        self._memory_limits = memory_limits
        self._dtype_setting = dtype
        self._quantization_setting = quantization_setting
        self._batching = batching
        self._loaded: dict[str, LoadedModel] = {}
        self._changed_at: dict[str, datetime] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._active: Counter[str] = Counter()

    # The async port, for the engine's event loop.

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        return await self._off_loop(lambda: self.load_blocking(model_id, device))

    async def unload_model(self, model_id: str) -> Model:
        return await self._off_loop(lambda: self.unload_blocking(model_id))

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        loaded = self._loaded.get(model_id)
        if loaded is None:
            self._catalog.get(model_id)  # an unknown id is "not found", not "not loaded"
            raise ModelNotLoadedError.for_id(model_id)
        started = time.perf_counter()
        self._check_queue_room(loaded)  # refuse at once, before the tokenizer's thread hop
        prompt_ids = await self._off_loop(lambda: encode_prompt(loaded, prompt))
        check_context_window(loaded, len(prompt_ids), params.max_new_tokens)
        deadline = time.monotonic() + params.timeout_s
        request = SamplingRequest(
            prompt_ids, params.max_new_tokens, params.temperature, deadline, top_p=params.top_p, seed=params.seed
        )
        self._check_cache_room(loaded, request)
        self._check_queue_room(loaded)  # others may have queued while this prompt was tokenized
        events = EventStream()
        decoder = IncrementalDecoder(loaded.tokenizer, params.stop)
        with self._locks_guard:
            self._active[model_id] += 1
        sequence = loaded.scheduler.submit(request, events.sink)
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
                            "stop", sequence.prompt_length, len(decoder.token_ids), sequence.cached_prompt_tokens
                        )
                        break
                else:
                    finish = event
        finally:
            if finish is None:
                sequence.cancel()  # the caller left: its batch slot frees at the next step
            with self._locks_guard:
                self._active[model_id] -= 1
            loaded.last_used_at = _now()
        if held_back := decoder.flush():  # text that could have begun a stop string, which never came
            yield held_back
        yield self._result(loaded, params, finish, decoder, started, first_token_at)

    async def get_model(self, model_id: str) -> Model:
        return self._describe(self._catalog.get(model_id))

    async def list_models(self) -> list[Model]:
        return [self._describe(entry) for entry in self._catalog.entries().values()]

    async def _off_loop(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

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
            self._loaded[model_id] = on_a_thread_of_its_own(lambda: self._load(entry, target))
            self._changed_at[model_id] = _now()
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
        """Loaded models whose batch scheduler died, and why: they serve nothing until reloaded."""
        return {model_id: loaded.scheduler.failure for model_id, loaded in list(self._loaded.items()) if loaded.scheduler.failure}

    def loaded(self, model_id: str) -> LoadedModel | None:
        return self._loaded.get(model_id)

    def _check_cache_room(self, loaded: LoadedModel, request: SamplingRequest) -> None:
        needed, capacity = loaded.scheduler.blocks_needed(request), loaded.scheduler.capacity_blocks
        if needed > capacity:
            raise InvalidRequestError(
                f"query, context and max_length: the request needs {needed * BLOCK_SIZE} tokens of KV cache, "
                f"past the {capacity * BLOCK_SIZE} that KV_CACHE_MB holds for {loaded.model_id!r}"
            )

    def _check_queue_room(self, loaded: LoadedModel) -> None:
        waiting = loaded.scheduler.waiting
        if waiting >= self._batching.max_queue_size:
            raise OverloadedError(
                f"{waiting} requests are already queued for {loaded.model_id!r} (MAX_QUEUE_SIZE="
                f"{self._batching.max_queue_size}) behind a full batch; retry shortly"
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
        if finish.reason == "timeout":
            raise GenerationTimeoutError(
                f"generation passed MAX_GENERATION_TIME={params.timeout_s:g}s and was stopped; "
                f"ask for fewer tokens (max_length) or raise MAX_GENERATION_TIME"
            )
        if finish.reason == "cancelled" and finish.detail == UNLOADED:
            raise ModelUnloadingError(f"model {loaded.model_id!r} was unloaded before this generation finished")
        if finish.reason not in ("stop", "length"):
            raise GenerationError(f"generation with {loaded.model_id!r} failed: {finish.reason} {finish.detail}".strip())
        generation_time = time.perf_counter() - started
        GENERATION_SECONDS.labels(model=loaded.model_id).observe(generation_time)
        return Generation(
            text=decoder.text(),
            model_id=loaded.model_id,
            finish_reason=finish.reason,
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

    def _load(self, entry: CatalogEntry, device: str) -> LoadedModel:
        dtype = dtype_for(device, self._dtype_setting)
        scheme = quantization.effective_quantization(self._quantization_setting, device)
        files_size = sum(p.stat().st_size for p in Path(entry.path).glob("*") if p.is_file())
        read_bytes = weights_at_load(entry.metadata, torch.finfo(dtype).bits // 8, files_size)
        kept_bytes = quantization.resident_weights_bytes(scheme, entry.path, entry.metadata, read_bytes)
        transient_bytes = read_bytes if scheme == quantization.INT8 else 0  # the read, beside its int8 copy
        footprint = estimate_footprint(kept_bytes, self._batching.kv_cache_bytes, transient_bytes)
        check_room_for(entry.model_id, footprint, device, self._memory_limits)
        logger.info("loading %s on %s as %s, quantization %s", entry.model_id, device, dtype, scheme)
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry.path)
            model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, device_map=device)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            release_freed_memory()
            raise InsufficientMemoryError(f"out of memory while loading {entry.model_id!r} on {device}: {exc}") from exc
        model.eval()
        int8_layers = quantization.quantize_linear_layers(model) if scheme == quantization.INT8 else 0
        if int8_layers:
            release_freed_memory()  # the float32 weights the int8 layers replaced
        switched = fast_linear.accelerate(model)
        if not paged_attention.install(model):
            raise GenerationError(
                f"{type(model).__name__} does not route attention through transformers' attention interface, "
                f"so the engine cannot batch it"
            )
        cache = self._kv_cache(model, dtype, device)
        scheduler = BatchScheduler(
            model,
            cache,
            eos_token_ids(model, tokenizer),
            max_batch_size=self._batching.max_batch_size,
            prefill_budget=self._batching.prefill_budget,
            batch_wait_s=self._batching.batch_wait_s,
            name=entry.model_id,
        )
        scheduler.start()
        memory_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        load_time = time.perf_counter() - started
        LOAD_SECONDS.labels(model=entry.model_id).observe(load_time)
        logger.info(
            "loaded %s in %.2fs (%.0f MB, KV cache %.0f MB, %d linear layers int8, %d on the small-row kernel)",
            entry.model_id, load_time, memory_bytes / 2**20, cache.size_bytes / 2**20, int8_layers, switched,
        )
        return LoadedModel(
            entry.model_id, model, tokenizer, device, dtype, scheme, round(load_time, 3), memory_bytes, cache, scheduler
        )

    def _kv_cache(self, model, dtype: torch.dtype, device: str) -> PagedKVCache:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_token = PagedKVCache.bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, dtype)
        blocks = max(1, self._batching.kv_cache_bytes // (per_token * BLOCK_SIZE))
        return PagedKVCache(config.num_hidden_layers, kv_heads, head_dim, blocks, dtype, device)

    def _drop(self, model_id: str) -> None:
        loaded = self._loaded.pop(model_id)
        self._changed_at[model_id] = _now()
        LOADED_MODELS.set(len(self._loaded))
        loaded.scheduler.stop(UNLOADED)
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
                batch=loaded.scheduler.load,
            )
            if loaded.scheduler.failure:
                metadata["engine_error"] = loaded.scheduler.failure
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
