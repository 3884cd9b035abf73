from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import ModelNotFoundError


@dataclass(frozen=True)
class CatalogEntry:
    """A model that exists (in the model store) and can be loaded."""

    model_id: str
    version: str
    path: str
    type: str
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)


class ModelCatalog(abc.ABC):
    """Knows which model ids exist; an id it does not know is a ModelNotFoundError."""

    @abc.abstractmethod
    def entries(self) -> dict[str, CatalogEntry]:
        """The newest entry of every known model id."""

    def get(self, model_id: str) -> CatalogEntry:
        entries = self.entries()
        if model_id not in entries:
            raise ModelNotFoundError.for_id(model_id, sorted(entries))
        return entries[model_id]

    def model_ids(self) -> list[str]:
        return sorted(self.entries())
