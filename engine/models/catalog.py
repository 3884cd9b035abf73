"""The BentoML model store as the catalog of models that exist."""

from __future__ import annotations

import bentoml

from domain import CatalogEntry, ModelCatalog

DEFAULT_MODEL_TYPE = "causal-lm"


class BentoModelStoreCatalog(ModelCatalog):
    """Read on each look-up, so a model imported while the service runs is available at once."""

    def entries(self) -> dict[str, CatalogEntry]:
        newest: dict[str, CatalogEntry] = {}
        for stored in bentoml.models.list():
            info = stored.info
            entry = CatalogEntry(
                model_id=stored.tag.name,
                version=str(stored.tag.version),
                path=stored.path,
                type=info.labels.get("type", DEFAULT_MODEL_TYPE),
                created_at=info.creation_time,
                metadata=dict(info.metadata),
            )
            current = newest.get(entry.model_id)
            if current is None or entry.created_at > current.created_at:
                newest[entry.model_id] = entry
        return newest
