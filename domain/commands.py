from __future__ import annotations

from dataclasses import dataclass, field

from .generation import GuidedDecoding, Prompt


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


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """What every generation command may ask for; None and () leave it to the operator's defaults."""

    model_id: str | None = None
    max_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log probability and k alternatives
    priority: int | str | None = None  # lower first, or a name from PRIORITY_NAMES
    guided: GuidedDecoding | None = None


@dataclass(frozen=True)
class GenerateText(GenerationOptions):
    """An answer to a query with the passages retrieved for it, in the service's prompt (POST /generate)."""

    query: str
    context: list[str] = field(default_factory=list)
    use_async: bool = True


@dataclass(frozen=True)
class CompletePrompt(GenerationOptions):
    """A generation from a prompt the caller wrote: chat messages as given, or raw text to continue (/v1)."""

    prompt: Prompt


@dataclass(frozen=True)
class Classify:
    """A decision among allowed labels for a query with its passages, in the service's prompt (POST /classify)."""

    query: str
    labels: tuple[str, ...]
    context: list[str] = field(default_factory=list)
    model_id: str | None = None
    timeout: float | None = None
    priority: int | str | None = None
    labels_field: str = "labels"  # what errors call the labels: /generate calls them `choices`
