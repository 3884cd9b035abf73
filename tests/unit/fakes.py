"""In-memory fakes of the domain's ports and of the engine core's StepRunner. They keep state, so
tests assert on what happened, not on calls.

Each fake subclasses the real abstract port, so a port that grows a method breaks the fakes loudly.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from domain import (
    CatalogEntry,
    ClassifyParams,
    Decision,
    DeviceNotAvailableError,
    Generation,
    GenerationLimits,
    GenerationParams,
    Model,
    ModelCatalog,
    ModelNotLoadedError,
    ModelRepository,
    ModelServiceError,
    Prompt,
    SystemMonitor,
)
from engine.core.engine_core import StepAborted, StepRunner
from engine.core.scheduler import ScheduledStep, StepOutput
from engine.core.sequence import Event, FinishEvent, TokenEvent

CREATED_AT = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)
LAST_USED = datetime(2024, 1, 2, 8, 30, tzinfo=timezone.utc)


def catalog_entry(model_id: str, version: str = "v1") -> CatalogEntry:
    return CatalogEntry(
        model_id=model_id,
        version=version,
        path=f"/models/{model_id}/{version}",
        type="causal-lm",
        created_at=CREATED_AT,
        metadata={"parameters": 135_000_000},
    )


class InMemoryCatalog(ModelCatalog):
    def __init__(self, *model_ids: str) -> None:
        self._entries = {model_id: catalog_entry(model_id) for model_id in model_ids}

    def entries(self) -> dict[str, CatalogEntry]:
        return dict(self._entries)


class FakeModelRepository(ModelRepository):
    """Keeps which models are loaded and where; behaves like the engine's repository:

    - an id the catalog does not know is a ModelNotFoundError (from the catalog);
    - device "auto" means the first of `devices`; a device not in `devices` is a DeviceNotAvailableError;
    - generating with a model that is not loaded is a ModelNotLoadedError;
    - `fail_next_generations` / `fail_next_loads` make the next calls raise the given error instead;
      `fail_generations_of` makes one model's generations and decisions raise it, until cleared.

    A generation echoes the last (user) message of the prompt, or a raw prompt's text, as its text.
    A decision picks the first label the last message mentions (else the first label), at 0.9.
    """

    def __init__(self, catalog: ModelCatalog, devices: tuple[str, ...] = ("cpu",)) -> None:
        self.catalog = catalog
        self.devices = devices
        self.loaded: dict[str, str] = {}  # model id -> device
        self.generations: list[tuple[str, Prompt, GenerationParams]] = []  # what was generated, in order
        self.decisions: list[tuple[str, Prompt, ClassifyParams]] = []  # what was classified, in order
        self._generation_failures: list[ModelServiceError] = []
        self._load_failures: list[ModelServiceError] = []
        self.failing_models: dict[str, ModelServiceError] = {}
        self.engine_errors: dict[str, str] = {}  # model id -> why its batch scheduler died

    # Test controls.

    def fail_next_generations(self, error_kind: type[ModelServiceError], times: int = 1) -> None:
        self._generation_failures += [error_kind(f"fake {error_kind.__name__}") for _ in range(times)]

    def fail_generations_of(self, model_id: str, error: ModelServiceError) -> None:
        self.failing_models[model_id] = error

    def _raise_if_failing(self, model_id: str) -> None:
        if self._generation_failures:
            raise self._generation_failures.pop(0)
        if model_id in self.failing_models:
            raise self.failing_models[model_id]

    def fail_next_loads(self, error_kind: type[ModelServiceError], times: int = 1) -> None:
        self._load_failures += [error_kind(f"fake {error_kind.__name__}") for _ in range(times)]

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self.loaded

    # The port.

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        self.catalog.get(model_id)
        if self._load_failures:
            raise self._load_failures.pop(0)
        if device == "auto":
            device = self.loaded.get(model_id, self.devices[0])
        if device not in self.devices:
            raise DeviceNotAvailableError(f"device {device!r} is not available (available: {self.devices})")
        self.loaded[model_id] = device
        return self._describe(model_id)

    async def unload_model(self, model_id: str) -> Model:
        self.catalog.get(model_id)
        self.loaded.pop(model_id, None)
        return self._describe(model_id)

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        self._raise_if_failing(model_id)
        if model_id not in self.loaded:
            self.catalog.get(model_id)
            raise ModelNotLoadedError.for_id(model_id)
        self.generations.append((model_id, prompt, params))
        text = prompt.text if prompt.text is not None else prompt.messages[-1].content
        for word in text.split(" "):
            yield word
        yield Generation(
            text=text,
            model_id=model_id,
            finish_reason="stop",
            prompt_tokens=len(" ".join([message.content for message in prompt.messages] + [prompt.text or ""]).split()),
            completion_tokens=len(text.split()),
            generation_time_s=0.0,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
        )

    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams) -> Decision:
        self._raise_if_failing(model_id)
        if model_id not in self.loaded:
            self.catalog.get(model_id)
            raise ModelNotLoadedError.for_id(model_id)
        self.decisions.append((model_id, prompt, params))
        text = prompt.messages[-1].content
        label = next((label for label in params.labels if label in text), params.labels[0])
        rest = (1 - 0.9) / max(1, len(params.labels) - 1)
        probabilities = {each: 0.9 if each == label else rest for each in params.labels}
        if len(params.labels) == 1:
            probabilities = {label: 1.0}
        return Decision(label, probabilities, model_id, len(text.split()), 0, 0.0)

    async def get_model(self, model_id: str) -> Model:
        self.catalog.get(model_id)
        return self._describe(model_id)

    async def list_models(self) -> list[Model]:
        return [self._describe(model_id) for model_id in self.catalog.model_ids()]

    def _describe(self, model_id: str) -> Model:
        entry = self.catalog.get(model_id)
        return Model(
            id=model_id,
            name=f"{model_id}:{entry.version}",
            type=entry.type,
            device=self.loaded.get(model_id, "none"),
            is_loaded=model_id in self.loaded,
            path=entry.path,
            created_at=entry.created_at,
            updated_at=entry.created_at,
            metadata={
                **entry.metadata,
                **({"last_used_at": LAST_USED.isoformat()} if model_id in self.loaded else {}),
                **({"engine_error": self.engine_errors[model_id]} if model_id in self.engine_errors else {}),
            },
        )


class FakeSystemMonitor(SystemMonitor):
    """Reports fixed memory figures and counts how often memory was optimized."""

    def __init__(self) -> None:
        self.optimizations = 0
        self.rss_mb = 512.0

    async def memory_usage(self) -> dict[str, Any]:
        return {"rss_mb": self.rss_mb, "system_percent": 42.0}

    async def optimize_memory(self) -> dict[str, Any]:
        self.optimizations += 1
        before, self.rss_mb = self.rss_mb, self.rss_mb / 2
        return {"rss_before_mb": before, "rss_after_mb": self.rss_mb, "freed_mb": before - self.rss_mb}

    async def system_info(self) -> dict[str, Any]:
        return {"platform": "fake", "cpu_count": 4}


DEFAULT_MODEL_ID = "default-model"
TEST_MODEL_ID = "test-model"
SYSTEM_PROMPT = "You are a test assistant."
LIMITS = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30.0)


EOS = 2  # the end-of-sequence token of the scheduler's unit tests


class ScriptedRunner(StepRunner):
    """Answers each prompt with the tokens scripted for it (then FILLER), and keeps every step it ran.
    `fail_with` makes the next steps raise it; `fatal` says whether that error is fatal;
    `step_s` is how long a step takes."""

    FILLER = 1

    def __init__(self, script: dict[tuple[int, ...], list[int]] | None = None) -> None:
        self._script = script or {}
        self.steps: list[ScheduledStep] = []
        self.forgotten: set[int] = set()
        self.fail_with: Exception | None = None
        self.fatal = False
        self.step_s = 0.0
        self.aborted = threading.Event()

    def execute(self, step: ScheduledStep) -> StepOutput:
        self.steps.append(step)
        self.forgotten.update(step.finished_ids)
        if self.aborted.wait(self.step_s):  # a step stops early when aborted, as the model runner's does
            raise StepAborted
        if self.fail_with is not None:
            raise self.fail_with
        token_ids = [self._next_token(s.request.prompt_ids, len(s.output_ids)) for s in step.sampled]
        scores = {}
        for chunk in step.scored:
            wanted = {scored.position: scored.token_ids for scored in chunk.sequence.request.scored}
            scores[chunk.sequence.seq_id] = {at: self.score(at, wanted[at]) for at in chunk.scored_positions}
        return StepOutput(token_ids, scores=scores)

    @staticmethod
    def score(position: int, token_ids: tuple[int, ...]) -> tuple[float, ...]:
        """The log probabilities it gives tokens at a scored position: distinct for each position and token."""
        return tuple(-(position + token_id / 1000) for token_id in token_ids)

    def is_fatal(self, error: Exception) -> bool:
        return self.fatal

    def abort(self) -> None:
        self.aborted.set()

    def reset_abort(self) -> None:
        self.aborted.clear()

    def _next_token(self, prompt_ids: list[int], generated: int) -> int:
        answer = self._script.get(tuple(prompt_ids), [])
        return answer[generated] if generated < len(answer) else self.FILLER


class RecordingCaller:
    """A request's caller, as the engine sees it: a sink that keeps every event sent to it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.started = threading.Event()
        self.finished = threading.Event()

    def sink(self, event: Event) -> None:
        self.events.append(event)
        self.started.set()
        if isinstance(event, FinishEvent):
            self.finished.set()

    @property
    def tokens(self) -> list[int]:
        return [event.token_id for event in self.events if isinstance(event, TokenEvent)]

    @property
    def finish(self) -> FinishEvent | None:
        """How the request ended, or None while it has not."""
        return self.events[-1] if self.finished.is_set() else None

    def wait_finish(self, timeout_s: float = 10.0) -> FinishEvent:
        assert self.finished.wait(timeout_s), "the request never ended"
        return self.events[-1]
