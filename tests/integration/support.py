"""Helpers shared by the integration tests."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from domain import CatalogEntry, ModelCatalog
from engine.models.catalog import BentoModelStoreCatalog
from engine.models.memory import MemoryLimits

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
TINY_QWEN_ID = "tiny-qwen2"
ROOMY = MemoryLimits(max_usage_fraction=0.95, min_free_gb=0.5, gpu_memory_fraction=0.8)
# For `@pytest.mark.parametrize("repository", QUANTIZATIONS, indirect=True)`: the test runs on both.
QUANTIZATIONS = ("none", "int8")


class DirectoryCatalog(ModelCatalog):
    """The store's models plus model directories outside it, such as a freshly made test model."""

    def __init__(self, extra: dict[str, Path]) -> None:
        self._store = BentoModelStoreCatalog()
        self._extra = extra

    def entries(self) -> dict[str, CatalogEntry]:
        made = datetime.now(timezone.utc)
        extra = {
            model_id: CatalogEntry(model_id, "test", str(path), "causal-lm", made, {"parameters": None})
            for model_id, path in self._extra.items()
        }
        return {**self._store.entries(), **extra}
