"""Fallback chains: a request for a chain goes to its members in order, on to the next when one cannot
serve it now, with the time the request has left; the answer names the member that served it."""

from __future__ import annotations

import asyncio

import pytest

from domain import (
    Classify,
    CompletePrompt,
    DeviceNotAvailableError,
    EngineUnavailableError,
    ExternalModelError,
    GenerateText,
    GenerateTextUseCase,
    GenerationError,
    GenerationTimeoutError,
    InsufficientMemoryError,
    InvalidRequestError,
    LoadModel,
    LruResponseCache,
    ModelNotFoundError,
    ModelNotLoadedError,
    ModelService,
    ModelServiceError,
    ModelUnloadingError,
    OverloadedError,
    Prompt,
    PromptBuilder,
    ProviderError,
    ProviderUnavailableError,
    UnloadModel,
)
from domain.use_cases import FALLBACK_ERRORS
from tests.unit.fakes import (
    DEFAULT_MODEL_ID,
    LIMITS,
    SYSTEM_PROMPT,
    TEST_MODEL_ID,
    FakeModelRepository,
    FakeSystemMonitor,
)

CHAIN = "either-model"
MEMBERS = (DEFAULT_MODEL_ID, TEST_MODEL_ID)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def models(repository: FakeModelRepository, monitor: FakeSystemMonitor) -> ModelService:
    service = ModelService(repository, monitor, DEFAULT_MODEL_ID, "cpu", fallbacks={CHAIN: MEMBERS})
    for model_id in MEMBERS:
        asyncio.run(service.load_model(LoadModel(model_id)))
    return service


@pytest.fixture
def passed_over() -> list[tuple[str, str, str]]:
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def use_case(models, repository, passed_over, clock) -> GenerateTextUseCase:
    def observed(chain: str, member: str, error: ModelServiceError) -> None:
        passed_over.append((chain, member, error.error_type))
        clock.now += 5  # the failed member took 5 seconds

    return GenerateTextUseCase(
        models, repository, PromptBuilder(SYSTEM_PROMPT), LIMITS, on_fallback=observed, clock=clock
    )


def ask(use_case: GenerateTextUseCase, **options) -> object:
    return asyncio.run(use_case(GenerateText("Hello there", model_id=CHAIN, **options)))


def test_the_first_member_serves_when_it_can(use_case, repository, passed_over) -> None:
    generation = ask(use_case)

    assert generation.model_id == DEFAULT_MODEL_ID
    assert [model_id for model_id, _, _ in repository.generations] == [DEFAULT_MODEL_ID]
    assert passed_over == []


@pytest.mark.parametrize("kind", FALLBACK_ERRORS, ids=lambda kind: kind.error_type)
def test_a_member_that_cannot_serve_now_passes_the_request_on(use_case, repository, passed_over, kind) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, kind("busy or down"))

    generation = ask(use_case)

    assert generation.model_id == TEST_MODEL_ID
    assert passed_over == [(CHAIN, DEFAULT_MODEL_ID, kind.error_type)]


def test_the_triggers_are_the_errors_of_a_member_that_cannot_serve_now() -> None:
    assert set(FALLBACK_ERRORS) == {
        OverloadedError, ModelNotLoadedError, ModelUnloadingError, DeviceNotAvailableError, InsufficientMemoryError,
        EngineUnavailableError, ProviderError, ProviderUnavailableError, GenerationTimeoutError,
    }


@pytest.mark.parametrize("kind", [InvalidRequestError, ModelNotFoundError, GenerationError, ExternalModelError])
def test_an_error_every_member_would_give_reaches_the_caller_at_once(use_case, repository, kind) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, kind("the request itself"))

    with pytest.raises(kind, match="the request itself"):
        ask(use_case)

    assert repository.generations == []


def test_the_next_member_gets_the_time_the_request_has_left(use_case, repository) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, OverloadedError("full"))

    ask(use_case, timeout=12.0)

    _, _, params = repository.generations[-1]
    assert params.timeout_s == pytest.approx(7.0)


def test_no_member_is_tried_once_the_time_is_spent(use_case, repository, passed_over) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, OverloadedError("full"))

    with pytest.raises(OverloadedError, match="no member could serve the request"):
        ask(use_case, timeout=4.0)

    assert repository.generations == [] and len(passed_over) == 1


def test_when_every_member_fails_the_error_names_each_with_the_soonest_retry(use_case, repository) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, OverloadedError("queue full", retry_after_s=8.0))
    repository.fail_generations_of(TEST_MODEL_ID, ProviderUnavailableError("circuit open", retry_after_s=3.0))

    with pytest.raises(ProviderUnavailableError) as raised:
        ask(use_case)

    assert raised.value.message == (
        f"fallback chain {CHAIN!r}: no member could serve the request "
        f"({DEFAULT_MODEL_ID!r}: queue full; {TEST_MODEL_ID!r}: circuit open)"
    )
    assert raised.value.retry_after_s == 3.0


def test_a_member_not_loaded_is_loaded_first_as_any_model_is(use_case, models, repository, passed_over) -> None:
    asyncio.run(models.unload_model(UnloadModel(DEFAULT_MODEL_ID)))

    generation = ask(use_case)

    assert generation.model_id == DEFAULT_MODEL_ID and repository.is_loaded(DEFAULT_MODEL_ID)
    assert passed_over == []


def test_a_stream_falls_back_before_its_first_piece(use_case, repository) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, EngineUnavailableError("restarting"))
    command = CompletePrompt(prompt=Prompt.raw("one two"), model_id=CHAIN)

    async def streamed() -> list:
        return [item async for item in use_case.stream(command)]

    *pieces, generation = asyncio.run(streamed())

    assert pieces == ["one", "two"] and generation.model_id == TEST_MODEL_ID


def test_an_opened_stream_names_the_member_that_serves_it_before_its_first_piece(use_case, repository) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, OverloadedError("full"))

    async def opened() -> tuple[str, str]:
        served, items = await use_case.open_stream(CompletePrompt(prompt=Prompt.raw("one two"), model_id=CHAIN))
        return served, await anext(items)

    assert asyncio.run(opened()) == (TEST_MODEL_ID, "one")


def test_a_decision_falls_back_too(use_case, repository) -> None:
    repository.fail_generations_of(DEFAULT_MODEL_ID, InsufficientMemoryError("no room"))

    decision = asyncio.run(use_case.classify(Classify("is it yes?", ("yes", "no"), model_id=CHAIN)))

    assert decision.model_id == TEST_MODEL_ID and decision.label == "yes"


def test_a_chain_reserves_nothing_at_the_door(use_case) -> None:
    assert use_case.engine_work(GenerateText("Hello", model_id=CHAIN, temperature=0.5)) is None
    assert use_case.engine_work(Classify("Hello", ("a", "b"), model_id=CHAIN)) is None
    assert use_case.engine_work(GenerateText("Hello", model_id=DEFAULT_MODEL_ID, temperature=0.5)) is not None


def test_a_cached_answer_names_the_member_that_served_it(models, repository) -> None:
    use_case = GenerateTextUseCase(models, repository, PromptBuilder(SYSTEM_PROMPT), LIMITS, cache=LruResponseCache(8))
    repository.fail_generations_of(DEFAULT_MODEL_ID, OverloadedError("full"))
    served = ask(use_case, temperature=0.0)
    repository.failing_models.clear()

    again = ask(use_case, temperature=0.0)

    assert served.model_id == again.model_id == TEST_MODEL_ID
    assert again.cached and len(repository.generations) == 1


class TestModelService:
    def test_lists_each_chain_after_the_models_with_its_members(self, models) -> None:
        listed = asyncio.run(models.list_models())

        assert [model.id for model in listed] == [DEFAULT_MODEL_ID, TEST_MODEL_ID, CHAIN]
        chain = listed[-1]
        assert (chain.kind, chain.is_loaded, chain.metadata) == ("fallback", False, {"members": list(MEMBERS)})
        assert asyncio.run(models.get_model(CHAIN)) == chain

    @pytest.mark.parametrize("operation", [lambda m: m.load_model(LoadModel(CHAIN)), lambda m: m.unload_model(UnloadModel(CHAIN))])
    def test_loading_or_unloading_a_chain_is_refused_naming_its_members(self, models, repository, operation) -> None:
        with pytest.raises(ExternalModelError, match=f"{CHAIN!r} is a fallback chain over {DEFAULT_MODEL_ID}, {TEST_MODEL_ID}"):
            asyncio.run(operation(models))

        assert repository.is_loaded(DEFAULT_MODEL_ID)

    def test_members_of_a_model_that_is_no_chain_is_the_model_itself(self, models) -> None:
        assert models.members(DEFAULT_MODEL_ID) == (DEFAULT_MODEL_ID,)
        assert models.members(CHAIN) == MEMBERS
