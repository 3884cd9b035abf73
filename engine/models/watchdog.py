"""Memory, watched: constant monitoring, forced collection past the limits, and automatic unloading
of unused models when collection is not enough."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from ..repository import TransformersModelRepository
from .memory import MemoryLimits, SystemMemory, publish_memory_metrics, release_freed_memory, system_memory

logger = logging.getLogger(__name__)


class MemoryWatchdog:
    """Every `interval_s`: unload models unused for `idle_timeout_s` (MODEL_IDLE_TIMEOUT, 0 = never,
    like Ollama's keep_alive); then, when memory use passes MAX_MEMORY_USAGE or free memory falls
    below MIN_MEMORY_GB, free what is garbage and unload idle models, least recently used first,
    until memory is back within the limits; then it publishes the engine's memory on /metrics. A
    model a generation is using is never unloaded, and memory pressure never unloads the default
    model (requests would only load it again)."""

    def __init__(
        self,
        repository: TransformersModelRepository,
        limits: MemoryLimits,
        keep: set[str],
        interval_s: float = 5.0,
        measure: Callable[[], SystemMemory] = system_memory,
        idle_timeout_s: float = 0.0,
    ) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._repository = repository
        self._limits = limits
        self._keep = keep
        self._interval_s = interval_s
        self._measure = measure
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval_s + 1)

    def check(self) -> list[str]:
        """One round; the models it unloaded."""
        unloaded = self._unload_expired()
        if not self._measure().over(self._limits):
            return unloaded
        release_freed_memory()
        return unloaded + self._repository.unload_idle(
            until=lambda: not self._measure().over(self._limits),
            keep=self._keep,
            reason="memory_pressure",
            why="memory past its limits",
        )

    def _unload_expired(self) -> list[str]:
        if not self._idle_timeout_s:
            return []
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self._idle_timeout_s)
        expired = []
        for model_id in self._repository.idle_models():
            loaded = self._repository.loaded(model_id)
            if loaded is not None and loaded.last_used_at < cutoff and self._repository.unload_if_idle(model_id):
                logger.info("unloaded %s: unused for MODEL_IDLE_TIMEOUT=%gs", model_id, self._idle_timeout_s)
                expired.append(model_id)
        return expired

    def _watch(self) -> None:
        while True:  # the first round at once, so that /metrics shows memory from the start
            try:
                self.check()
                publish_memory_metrics()
            except Exception:  # the watchdog must outlive any one bad round
                logger.exception("memory watchdog round failed")
            if self._stopped.wait(self._interval_s):
                return
