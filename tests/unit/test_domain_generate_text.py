"""GenerateTextUseCase: prompt and parameters for the engine, and recovery from the recoverable errors."""

from __future__ import annotations

import asyncio
import re

import pytest

from domain import (
    ChatMessage,
    Classify,
    CompletePrompt,
    GenerateText,
    GenerateTextUseCase,
    GenerationError,
    GuidedDecoding,
    InsufficientMemoryError,
    InvalidRequestError,
    LoadModel,
    ModelNotFoundError,
    ModelNotLoadedError,
    ModelService,
    Prompt,
    PromptBuilder,
)
from tests.unit.fakes import (
    DEFAULT_MODEL_ID,
    LIMITS,
    SYSTEM_PROMPT,
    TEST_MODEL_ID,
    FakeModelRepository,
    FakeSystemMonitor,
)


def load(service: ModelService, model_id: str = DEFAULT_MODEL_ID) -> None:
    asyncio.run(service.load_model(LoadModel(model_id, "cpu")))


def last_prompt(repository: FakeModelRepository):
    _, prompt, _ = repository.generations[-1]
    return prompt


class TestPrompt:
    def test_has_the_system_prompt_then_the_user_message(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)

        asyncio.run(generate_text(GenerateText("What is BentoML?", ["BentoML serves models."])))

        assert last_prompt(repository).messages == (
            ChatMessage("system", SYSTEM_PROMPT),
            ChatMessage("user", "What is BentoML?\n\nContext:\n[1] BentoML serves models."),
        )

    def test_numbers_the_context_passages_in_order(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("Which?", ["first", "second", "third"])))

        assert generation.text == "Which?\n\nContext:\n[1] first\n[2] second\n[3] third"

    def test_is_the_query_alone_without_context(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("Just the question")))

        assert generation.text == "Just the question"

    def test_drops_blank_passages_and_keeps_the_numbering_contiguous(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("q", ["", "  a  ", "\n\t", "b"])))

        assert generation.text == "q\n\nContext:\n[1] a\n[2] b"

    def test_is_the_query_alone_when_every_passage_is_blank(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("q", ["", "   "])))

        assert generation.text == "q"


class TestParameters:
    @pytest.mark.parametrize(
        "max_length, expected",
        [(None, 10), (1, 1), (5, 5), (10, 10), (11, 10), (5000, 10)],
    )
    def test_max_length_is_capped_at_max_new_tokens(
        self, generate_text: GenerateTextUseCase, service: ModelService, max_length: int | None, expected: int
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("q", max_length=max_length)))

        assert generation.max_new_tokens == expected

    def test_temperature_defaults_to_the_configured_one(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("q")))

        assert generation.temperature == LIMITS.default_temperature

    @pytest.mark.parametrize("temperature", [0.0, 0.7, 2.0])
    def test_a_given_temperature_is_kept_even_zero(
        self, generate_text: GenerateTextUseCase, service: ModelService, temperature: float
    ) -> None:
        load(service)

        generation = asyncio.run(generate_text(GenerateText("q", temperature=temperature)))

        assert generation.temperature == temperature

    def test_timeout_is_the_max_generation_time(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)

        asyncio.run(generate_text(GenerateText("q")))

        _, _, params = repository.generations[-1]
        assert params.timeout_s == LIMITS.max_generation_time_s

    def test_without_a_model_id_the_default_model_generates(
        self, generate_text: GenerateTextUseCase, service: ModelService
    ) -> None:
        load(service)

        assert asyncio.run(generate_text(GenerateText("q"))).model_id == DEFAULT_MODEL_ID

    def test_the_requested_model_generates(self, generate_text: GenerateTextUseCase, service: ModelService) -> None:
        load(service, TEST_MODEL_ID)

        assert asyncio.run(generate_text(GenerateText("q", model_id=TEST_MODEL_ID))).model_id == TEST_MODEL_ID


class TestRecoveryFromAModelThatIsNotLoaded:
    def test_loads_the_model_and_generates(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository
    ) -> None:
        assert not repository.is_loaded(TEST_MODEL_ID)

        generation = asyncio.run(generate_text(GenerateText("hello", model_id=TEST_MODEL_ID)))

        assert generation.text == "hello"
        assert repository.loaded == {TEST_MODEL_ID: "cpu"}

    def test_loads_on_the_default_device(self, repository: FakeModelRepository) -> None:
        service = ModelService(repository, FakeSystemMonitor(), DEFAULT_MODEL_ID, default_device="cuda:0")
        generate_text = GenerateTextUseCase(service, repository, PromptBuilder(), LIMITS)

        asyncio.run(generate_text(GenerateText("hello")))

        assert repository.loaded == {DEFAULT_MODEL_ID: "cuda:0"}

    def test_with_auto_load_off_the_error_reaches_the_caller(
        self, service: ModelService, repository: FakeModelRepository
    ) -> None:
        generate_text = GenerateTextUseCase(service, repository, PromptBuilder(), LIMITS, auto_load=False)

        with pytest.raises(ModelNotLoadedError):
            asyncio.run(generate_text(GenerateText("hello")))

        assert repository.loaded == {}
        assert repository.generations == []

    def test_the_same_error_twice_reaches_the_caller(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        repository.fail_next_generations(ModelNotLoadedError, times=2)

        with pytest.raises(ModelNotLoadedError):
            asyncio.run(generate_text(GenerateText("hello")))

        assert repository.generations == []

    def test_an_unknown_model_is_not_found_and_nothing_is_loaded(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository
    ) -> None:
        with pytest.raises(ModelNotFoundError):
            asyncio.run(generate_text(GenerateText("hello", model_id="no-such-model")))

        assert repository.loaded == {}


class TestRecoveryFromInsufficientMemory:
    def test_optimizes_memory_and_generates(
        self,
        generate_text: GenerateTextUseCase,
        service: ModelService,
        repository: FakeModelRepository,
        monitor: FakeSystemMonitor,
    ) -> None:
        load(service)
        repository.fail_next_generations(InsufficientMemoryError)

        generation = asyncio.run(generate_text(GenerateText("hello")))

        assert generation.text == "hello"
        assert monitor.optimizations == 1

    def test_the_same_error_twice_reaches_the_caller_after_one_optimization(
        self,
        generate_text: GenerateTextUseCase,
        service: ModelService,
        repository: FakeModelRepository,
        monitor: FakeSystemMonitor,
    ) -> None:
        load(service)
        repository.fail_next_generations(InsufficientMemoryError, times=2)

        with pytest.raises(InsufficientMemoryError):
            asyncio.run(generate_text(GenerateText("hello")))

        assert monitor.optimizations == 1
        assert repository.generations == []

    def test_a_memory_error_while_auto_loading_is_recovered_too(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository, monitor: FakeSystemMonitor
    ) -> None:
        repository.fail_next_loads(InsufficientMemoryError)

        generation = asyncio.run(generate_text(GenerateText("hello")))

        assert generation.text == "hello"
        assert repository.is_loaded(DEFAULT_MODEL_ID)
        assert monitor.optimizations == 1

    def test_a_memory_error_on_every_auto_load_reaches_the_caller(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository, monitor: FakeSystemMonitor
    ) -> None:
        repository.fail_next_loads(InsufficientMemoryError, times=2)

        with pytest.raises(InsufficientMemoryError):
            asyncio.run(generate_text(GenerateText("hello")))

        assert repository.loaded == {}
        assert monitor.optimizations == 1

    def test_not_loaded_and_out_of_memory_are_each_recovered_once(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository, monitor: FakeSystemMonitor
    ) -> None:
        repository.fail_next_generations(InsufficientMemoryError)  # then: not loaded, since nothing is

        generation = asyncio.run(generate_text(GenerateText("hello")))

        assert generation.text == "hello"
        assert repository.is_loaded(DEFAULT_MODEL_ID)
        assert monitor.optimizations == 1


def test_other_errors_reach_the_caller_without_recovery(
    generate_text: GenerateTextUseCase,
    service: ModelService,
    repository: FakeModelRepository,
    monitor: FakeSystemMonitor,
) -> None:
    load(service)
    repository.fail_next_generations(GenerationError)

    with pytest.raises(GenerationError):
        asyncio.run(generate_text(GenerateText("hello")))

    assert monitor.optimizations == 0
    assert repository.generations == []


class TestCompletePrompt:
    def test_the_callers_prompt_reaches_the_model_as_it_is(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service, TEST_MODEL_ID)
        messages = Prompt((ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "bye")))

        generation = asyncio.run(generate_text(CompletePrompt(messages, model_id=TEST_MODEL_ID)))

        assert last_prompt(repository) == messages  # no system prompt added
        assert generation.text == "bye" and generation.model_id == TEST_MODEL_ID

    def test_a_raw_prompt_reaches_the_model_with_its_options(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        command = CompletePrompt(Prompt.raw("Once upon"), max_length=4, top_p=0.3, stop=("\n",), seed=11)

        asyncio.run(generate_text(command))

        model_id, prompt, params = repository.generations[-1]
        assert model_id == DEFAULT_MODEL_ID and prompt == Prompt.raw("Once upon")
        assert (params.max_new_tokens, params.top_p, params.stop, params.seed) == (4, 0.3, ("\n",), 11)

    def test_an_unloaded_model_is_loaded_as_for_generate_text(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository
    ) -> None:
        asyncio.run(generate_text(CompletePrompt(Prompt.raw("x"), model_id=TEST_MODEL_ID)))

        assert repository.is_loaded(TEST_MODEL_ID)


class TestClassify:
    def test_a_decision_gets_the_services_prompt_and_the_request_bounds(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)

        decision = asyncio.run(
            generate_text.classify(Classify("Spam?", ("yes", "no"), ["Buy no watches"], timeout=5, priority="batch"))
        )

        _, prompt, params = repository.decisions[-1]
        assert prompt.messages[-1] == ChatMessage("user", "Spam?\n\nContext:\n[1] Buy no watches")
        assert params.labels == ("yes", "no") and params.timeout_s == 5 and params.priority == 10
        assert decision.label == "no"

    def test_an_unloaded_model_is_loaded_for_a_decision(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository
    ) -> None:
        decision = asyncio.run(generate_text.classify(Classify("Spam?", ("yes", "no"))))

        assert repository.is_loaded(DEFAULT_MODEL_ID) and decision.model_id == DEFAULT_MODEL_ID

    @pytest.mark.parametrize(
        ("labels", "field", "message"),
        [
            ((), "labels", "labels: must hold 1 to 64 labels, got 0"),
            (("a",) * 65, "labels", "labels: must hold 1 to 64 labels, got 65"),
            (("yes", ""), "choices", "choices.1: must be 1 to 200 characters, got ''"),
            (("yes", "no", "yes"), "labels", "labels: each label must be distinct, got 'yes' more than once"),
        ],
    )
    def test_bad_labels_are_refused_naming_the_field(
        self, generate_text: GenerateTextUseCase, repository: FakeModelRepository, labels, field, message
    ) -> None:
        with pytest.raises(InvalidRequestError) as refused:
            asyncio.run(generate_text.classify(Classify("Spam?", labels, labels_field=field)))

        assert str(refused.value) == message and repository.decisions == []


class TestVerdictParams:
    def test_logprobs_priority_and_a_grammar_reach_the_engine(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        guided = GuidedDecoding("regex", "yes|no", "guided_regex")

        asyncio.run(generate_text(GenerateText("Spam?", logprobs=3, priority="interactive", guided=guided)))

        _, _, params = repository.generations[-1]
        assert (params.logprobs, params.priority, params.guided) == (3, -10, guided)

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"logprobs": 21}, "top_logprobs: must be between 0 and 20, got 21"),
            ({"priority": "urgent"}, "priority: must be one of ['batch', 'interactive', 'normal'] or an integer"),
            ({"priority": 101}, "priority: must be one of ['batch', 'interactive', 'normal'] or an integer"),
            ({"guided": GuidedDecoding("regex", "a", "guided_regex"), "ignore_eos": True}, "ignore_eos: cannot be true"),
            ({"guided": GuidedDecoding("regex", "a", "guided_regex"), "min_tokens": 2}, "min_tokens: must be 0"),
            ({"guided": GuidedDecoding("grammar", "a", "guided_grammar")}, "guided_grammar: must be one of"),
        ],
    )
    def test_bad_verdict_params_are_refused_naming_the_field(
        self, generate_text: GenerateTextUseCase, options, message
    ) -> None:
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            asyncio.run(generate_text(GenerateText("Spam?", **options)))
