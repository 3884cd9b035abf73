from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

# What serves a model id: this service's engine, a provider's OpenAI-compatible API, or the first
# member of a fallback chain that can.
LOCAL, EXTERNAL, FALLBACK = "local", "external", "fallback"
MODEL_KINDS = (LOCAL, EXTERNAL, FALLBACK)


@dataclass
class Model:
    id: str
    name: str
    type: str
    device: str
    is_loaded: bool
    path: str
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any] | None = field(default=None)
    kind: Literal["local", "external", "fallback"] = LOCAL  # MODEL_KINDS

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Model:
        return cls(
            **{
                **data,
                "created_at": datetime.fromisoformat(data["created_at"]),
                "updated_at": datetime.fromisoformat(data["updated_at"]),
            }
        )
