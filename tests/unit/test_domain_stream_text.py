"""GenerateTextUseCase.stream: text as it comes, then the Generation; recovery only before the first piece."""

from __future__ import annotations

import asyncio

import pytest

from domain import (
    GenerateText,
    GenerateTextUseCase,
    Generation,
    GenerationParams,
    InsufficientMemoryError,
    LoadModel,
    ModelNotFoundError,
    ModelNotLoadedError,
    ModelRepository,
    ModelService,
    PromptBuilder,
)
from tests.unit.fakes import DEFAULT_MODEL_ID, LIMITS, FakeModelRepository


def collect(generate_text: GenerateTextUseCase, command: GenerateText) -> list:
    async def gather() -> list:
        return [item async for item in generate_text.stream(command)]

    return asyncio.run(gather())


def test_streams_pieces_of_text_then_the_generation(generate_text, service):
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID)))
    *pieces, final = collect(generate_text, GenerateText(query="three little words"))
    assert pieces == ["three", "little", "words"]
    assert isinstance(final, Generation) and final.text == "three little words"


def test_a_model_that_is_not_loaded_is_loaded_before_the_stream_starts(generate_text, repository):
    items = collect(generate_text, GenerateText(query="hello"))
    assert repository.is_loaded(DEFAULT_MODEL_ID)
    assert items[0] == "hello" and isinstance(items[-1], Generation)


def test_memory_errors_before_the_first_piece_are_recovered_once(generate_text, service, repository, monitor):
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID)))
    repository.fail_next_generations(InsufficientMemoryError)
    assert isinstance(collect(generate_text, GenerateText(query="hi"))[-1], Generation)
    assert monitor.optimizations == 1
    repository.fail_next_generations(InsufficientMemoryError, times=2)
    with pytest.raises(InsufficientMemoryError):
        collect(generate_text, GenerateText(query="hi"))


def test_unknown_models_are_not_found_before_anything_is_sent(generate_text):
    with pytest.raises(ModelNotFoundError):
        collect(generate_text, GenerateText(query="hi", model_id="no-such-model"))


class BreaksMidStream(FakeModelRepository):
    async def stream_text(self, model_id, prompt, params):
        yield "first"
        raise ModelNotLoadedError("unloaded mid-stream")


def test_an_error_after_the_first_piece_is_not_retried(catalog, monitor):
    repository = BreaksMidStream(catalog)
    service = ModelService(repository, monitor, default_model_id=DEFAULT_MODEL_ID)
    generate_text = GenerateTextUseCase(service, repository, PromptBuilder(""), LIMITS)
    received = []

    async def read() -> None:
        async for item in generate_text.stream(GenerateText(query="hi")):
            received.append(item)

    with pytest.raises(ModelNotLoadedError, match="mid-stream"):
        asyncio.run(read())
    assert received == ["first"] and not repository.is_loaded(DEFAULT_MODEL_ID)


def test_generate_text_on_the_port_consumes_the_stream(repository, service):
    asyncio.run(service.load_model(LoadModel(DEFAULT_MODEL_ID)))
    generation = asyncio.run(
        ModelRepository.generate_text(repository, DEFAULT_MODEL_ID, PromptBuilder("").build("a b", []), GenerationParams(5, 0.0, 1))
    )
    assert generation.text == "a b"

