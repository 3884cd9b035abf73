"""The ModelRepository over the BentoML model store and transformers (the spec's OptimizedModelRepository)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
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
    InsufficientMemoryError,
    Model,
    ModelCatalog,
    ModelNotLoadedError,
    ModelRepository,
    ModelServiceError,
    Prompt,
)

from . import generation
from .devices import dtype_for, resolve_device
from .generation import LoadedModel
from .memory import MemoryLimits, check_room_for, estimate_footprint, release_freed_memory

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class TransformersModelRepository(ModelRepository):
    """Loads store models with transformers and generates with them on the engine's threads.

    The blocking work runs on `executor` so the engine's event loop keeps serving; loads and unloads
    of one model are serialized by a per-model lock, so two concurrent loads load it once.
    """

    def __init__(self, catalog: ModelCatalog, executor: Executor, memory_limits: MemoryLimits, dtype: str = "auto") -> None:
        self._catalog = catalog
        self._executor = executor
        self._memory_limits = memory_limits
        self._dtype_setting = dtype
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

    async def generate_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> Generation:
        return await self._off_loop(lambda: self.generate_blocking(model_id, prompt, params))

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
            self._loaded[model_id] = self._load(entry, target)
            self._changed_at[model_id] = _now()
        return self._describe(entry)

    def unload_blocking(self, model_id: str) -> Model:
        entry = self._catalog.get(model_id)
        with self._lock_for(model_id):
            if model_id in self._loaded:
                self._drop(model_id)
                self._changed_at[model_id] = _now()
        return self._describe(entry)

    def generate_blocking(self, model_id: str, prompt: Prompt, params: GenerationParams) -> Generation:
        loaded = self._loaded.get(model_id)
        if loaded is None:
            self._catalog.get(model_id)  # an unknown id is "not found", not "not loaded"
            raise ModelNotLoadedError.for_id(model_id)
        with self._locks_guard:
            self._active[model_id] += 1
        try:
            return generation.generate(loaded, prompt, params)
        except ModelServiceError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise InsufficientMemoryError(f"out of memory while generating with {model_id!r}: {exc}") from exc
        except Exception as exc:
            logger.exception("generation with %s failed", model_id)
            raise GenerationError(f"generation with {model_id!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._locks_guard:
                self._active[model_id] -= 1

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
            self._changed_at[model_id] = _now()
            return True

    def loaded(self, model_id: str) -> LoadedModel | None:
        return self._loaded.get(model_id)

    def _lock_for(self, model_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(model_id, threading.Lock())

    def _load(self, entry: CatalogEntry, device: str) -> LoadedModel:
        dtype = dtype_for(device, self._dtype_setting)
        files_size = sum(p.stat().st_size for p in Path(entry.path).glob("*") if p.is_file())
        footprint = estimate_footprint(entry.metadata, torch.finfo(dtype).bits // 8, files_size)
        check_room_for(entry.model_id, footprint, device, self._memory_limits)
        logger.info("loading %s on %s as %s", entry.model_id, device, dtype)
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry.path)
            model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, device_map=device)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            release_freed_memory()
            raise InsufficientMemoryError(f"out of memory while loading {entry.model_id!r} on {device}: {exc}") from exc
        model.eval()
        memory_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        load_time = time.perf_counter() - started
        logger.info("loaded %s in %.2fs (%.0f MB)", entry.model_id, load_time, memory_bytes / 2**20)
        return LoadedModel(entry.model_id, model, tokenizer, device, dtype, round(load_time, 3), memory_bytes)

    def _drop(self, model_id: str) -> None:
        loaded = self._loaded.pop(model_id)
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
                load_time_s=loaded.load_time_s,
                memory_mb=round(loaded.memory_bytes / 2**20, 1),
                loaded_at=loaded.loaded_at.isoformat(),
                last_used_at=loaded.last_used_at.isoformat(),
            )
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
