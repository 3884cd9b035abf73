"""The memory strategy of the spec: constant monitoring, forced collection past the limits, and
automatic unloading of unused models when collection is not enough."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .memory import MemoryLimits, SystemMemory, release_freed_memory, system_memory
from .repository import TransformersModelRepository

logger = logging.getLogger(__name__)


class MemoryWatchdog:
    """Every `interval_s`: when memory use passes MAX_MEMORY_USAGE or free memory falls below
    MIN_MEMORY_GB, free what is garbage, then unload idle models, least recently used first, until
    memory is back within the limits. A model a generation is using is never unloaded, and neither
    is the default model (requests would only load it again)."""

    def __init__(
        self,
        repository: TransformersModelRepository,
        limits: MemoryLimits,
        keep: set[str],
        interval_s: float = 5.0,
        measure: Callable[[], SystemMemory] = system_memory,
    ) -> None:
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
        if not self._measure().over(self._limits):
            return []
        release_freed_memory()
        unloaded = []
        for model_id in self._repository.idle_models():
            if not self._measure().over(self._limits):
                break
            if model_id not in self._keep and self._repository.unload_if_idle(model_id):
                logger.warning("memory past its limits: unloaded idle model %s", model_id)
                unloaded.append(model_id)
        return unloaded

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one bad round
                logger.exception("memory watchdog round failed")
