from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadModel:
    model_id: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class UnloadModel:
    model_id: str | None = None


@dataclass(frozen=True)
class OptimizeMemory:
    pass


@dataclass(frozen=True)
class GenerateText:
    query: str
    context: list[str] = field(default_factory=list)
    max_length: int | None = None
    temperature: float | None = None
    model_id: str | None = None
    use_async: bool = True
    timeout: float | None = None
