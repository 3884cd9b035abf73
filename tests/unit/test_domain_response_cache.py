"""The response cache: the LRU, the key, and GenerateTextUseCase answering deterministic requests from it."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from domain import (
    ChatMessage,
    CompletePrompt,
    GenerateText,
    GenerateTextUseCase,
    Generation,
    GenerationError,
    GenerationLimits,
    GenerationParams,
    GuidedDecoding,
    LoadModel,
    LruResponseCache,
    ModelService,
    Prompt,
    PromptBuilder,
    response_key,
)
from tests.unit.fakes import DEFAULT_MODEL_ID, LIMITS, SYSTEM_PROMPT, TEST_MODEL_ID, FakeModelRepository

ROOT = Path(__file__).resolve().parents[2]
PROMPT = Prompt((ChatMessage("system", "Be brief."), ChatMessage("user", "Is this post spam?")))
GREEDY = GenerationParams(max_new_tokens=10, temperature=0.0, timeout_s=30.0)


def generation(text: str = "No.") -> Generation:
    return Generation(
        text=text,
        model_id=DEFAULT_MODEL_ID,
        finish_reason="stop",
        prompt_tokens=12,
        completion_tokens=2,
        generation_time_s=0.4,
        max_new_tokens=10,
        temperature=0.0,
        time_to_first_token_s=0.1,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine):
    return asyncio.run(coroutine)


class TestLruResponseCache:
    def test_gives_back_what_was_put(self) -> None:
        cache = LruResponseCache(capacity=2)

        run(cache.put("a", generation("A")))

        assert run(cache.get("a")) == generation("A")
        assert run(cache.get("b")) is None

    def test_drops_the_least_recently_used_answer_past_its_capacity(self) -> None:
        cache = LruResponseCache(capacity=2)
        run(cache.put("a", generation("A")))
        run(cache.put("b", generation("B")))
        run(cache.get("a"))  # now "b" is the least recently used

        run(cache.put("c", generation("C")))

        assert len(cache) == 2
        assert run(cache.get("b")) is None
        assert run(cache.get("a")) == generation("A") and run(cache.get("c")) == generation("C")

    def test_putting_a_key_again_replaces_its_answer_and_refreshes_it(self) -> None:
        cache = LruResponseCache(capacity=2)
        run(cache.put("a", generation("A")))
        run(cache.put("b", generation("B")))

        run(cache.put("a", generation("A2")))
        run(cache.put("c", generation("C")))

        assert run(cache.get("a")) == generation("A2")
        assert run(cache.get("b")) is None

    def test_an_answer_expires_after_its_ttl(self) -> None:
        clock = FakeClock()
        cache = LruResponseCache(capacity=4, ttl_s=60.0, clock=clock)
        run(cache.put("a", generation()))

        clock.now += 59.9
        assert run(cache.get("a")) == generation()
        clock.now += 0.1
        assert run(cache.get("a")) is None
        assert len(cache) == 0

    def test_a_ttl_of_zero_keeps_answers_until_they_are_dropped(self) -> None:
        clock = FakeClock()
        cache = LruResponseCache(capacity=4, ttl_s=0.0, clock=clock)
        run(cache.put("a", generation()))

        clock.now += 10 * 365 * 24 * 3600

        assert run(cache.get("a")) == generation()

    def test_refuses_a_capacity_below_one(self) -> None:
        with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
            LruResponseCache(capacity=0)


class TestResponseKey:
    def test_is_the_same_in_every_process(self) -> None:
        """sha256 of canonical JSON: no per-process hash seed, so workers and instances agree."""
        code = (
            "from domain import ChatMessage, GenerationParams, Prompt, response_key\n"
            "print(response_key('m', Prompt((ChatMessage('user', 'hi'),)), GenerationParams(10, 0.0, 30.0)))"
        )
        keys = {
            subprocess.run(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for seed in ("1", "2")
        }

        assert keys == {response_key("m", Prompt((ChatMessage("user", "hi"),)), GenerationParams(10, 0.0, 30.0))}

    def test_is_versioned_and_stays_what_it_was(self) -> None:
        """Instances of two releases share Redis: a key that changes needs a new version in KEY_PREFIX."""
        key = response_key("smollm2-135m-instruct", PROMPT, GREEDY)

        assert key == "ai-model:response:v1:6f7af0d8280e50722956600013535582a0554b25dd16519a262472665fe9e17a"

    @pytest.mark.parametrize(
        "model_id, prompt, params",
        [
            (TEST_MODEL_ID, PROMPT, GREEDY),
            (DEFAULT_MODEL_ID, Prompt((ChatMessage("system", "Be kind."), PROMPT.messages[1])), GREEDY),
            (DEFAULT_MODEL_ID, Prompt((PROMPT.messages[0], ChatMessage("user", "Is this post spam"))), GREEDY),
            (DEFAULT_MODEL_ID, Prompt(PROMPT.messages[1:]), GREEDY),
            (DEFAULT_MODEL_ID, PROMPT, dataclasses.replace(GREEDY, max_new_tokens=11)),
            (DEFAULT_MODEL_ID, PROMPT, dataclasses.replace(GREEDY, temperature=0.5)),
            (DEFAULT_MODEL_ID, PROMPT, dataclasses.replace(GREEDY, logprobs=2)),
            (DEFAULT_MODEL_ID, PROMPT, dataclasses.replace(GREEDY, guided=GuidedDecoding("regex", "yes|no", "guided_regex"))),
        ],
        ids=["model", "system prompt", "query", "no system prompt", "max_new_tokens", "temperature", "logprobs", "grammar"],
    )
    def test_changes_with_everything_that_decides_the_text(self, model_id, prompt, params) -> None:
        assert response_key(model_id, prompt, params) != response_key(DEFAULT_MODEL_ID, PROMPT, GREEDY)

    def test_raw_prompts_key_on_their_text(self) -> None:
        once, twice = Prompt.raw("Once upon a time"), Prompt.raw("Twice upon a time")

        assert response_key(DEFAULT_MODEL_ID, once, GREEDY) != response_key(DEFAULT_MODEL_ID, twice, GREEDY)
        assert response_key(DEFAULT_MODEL_ID, once, GREEDY) == response_key(DEFAULT_MODEL_ID, Prompt.raw("Once upon a time"), GREEDY)
        assert response_key(DEFAULT_MODEL_ID, Prompt.raw(""), GREEDY) != response_key(DEFAULT_MODEL_ID, Prompt(()), GREEDY)

    def test_ignores_the_timeout_and_the_priority_which_decide_when_and_not_what(self) -> None:
        shorter = dataclasses.replace(GREEDY, timeout_s=1.5)
        urgent = dataclasses.replace(GREEDY, priority=-10)

        assert response_key(DEFAULT_MODEL_ID, PROMPT, shorter) == response_key(DEFAULT_MODEL_ID, PROMPT, GREEDY)
        assert response_key(DEFAULT_MODEL_ID, PROMPT, urgent) == response_key(DEFAULT_MODEL_ID, PROMPT, GREEDY)

    def test_grammars_key_on_what_they_allow(self) -> None:
        def key(guided: GuidedDecoding) -> str:
            return response_key(DEFAULT_MODEL_ID, PROMPT, dataclasses.replace(GREEDY, guided=guided))

        assert key(GuidedDecoding("regex", "yes|no", "guided_regex")) != key(GuidedDecoding("regex", "yes", "guided_regex"))

    def test_a_parameter_added_to_the_generation_parameters_joins_the_key_unless_left_at_its_default(self) -> None:
        @dataclasses.dataclass(frozen=True)
        class NewParams(GenerationParams):
            seed: int | None = None
            stop: tuple[str, ...] = dataclasses.field(default_factory=tuple)

        def key(**new: object) -> str:
            return response_key(DEFAULT_MODEL_ID, PROMPT, NewParams(10, 0.0, 30.0, **new))

        assert key() == key(seed=None, stop=()) == response_key(DEFAULT_MODEL_ID, PROMPT, GREEDY)
        assert len({key(), key(seed=1), key(seed=2), key(stop=("\n",)), key(seed=1, stop=("\n",))}) == 5


def load(service: ModelService) -> None:
    run(service.load_model(LoadModel(DEFAULT_MODEL_ID, "cpu")))


def streamed(use_case: GenerateTextUseCase, command: GenerateText) -> list[str | Generation]:
    async def collect() -> list[str | Generation]:
        return [item async for item in use_case.stream(command)]

    return run(collect())


@pytest.fixture
def cache() -> LruResponseCache:
    return LruResponseCache(capacity=8)


@pytest.fixture
def cached_generate_text(
    service: ModelService, repository: FakeModelRepository, cache: LruResponseCache
) -> GenerateTextUseCase:
    return GenerateTextUseCase(service, repository, PromptBuilder(SYSTEM_PROMPT), LIMITS, auto_load=True, cache=cache)


class TestGenerateTextWithTheResponseCache:
    def test_a_greedy_request_asked_again_is_answered_from_the_cache(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        command = GenerateText("Is this post spam?", ["Buy now!"], temperature=0.0)

        first = run(cached_generate_text(command))
        second = run(cached_generate_text(command))

        assert len(repository.generations) == 1
        assert not first.cached and second.cached
        assert second.text == first.text and second.completion_tokens == first.completion_tokens
        assert second.generation_time_s == 0.0 and second.time_to_first_token_s == 0.0

    def test_a_request_with_a_temperature_is_never_cached(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository,
        cache: LruResponseCache,
    ) -> None:
        load(service)
        command = GenerateText("Tell me a story.", temperature=0.7)

        answers = [run(cached_generate_text(command)) for _ in range(2)]

        assert len(repository.generations) == 2
        assert not any(answer.cached for answer in answers)
        assert len(cache) == 0

    def test_a_sampled_request_with_a_seed_is_cached_under_its_seed(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        seeded = [GenerateText("Tell me a story.", temperature=0.7, seed=seed) for seed in (7, 7, 8)]

        answers = [run(cached_generate_text(command)) for command in seeded]

        assert [answer.cached for answer in answers] == [False, True, False]
        assert len(repository.generations) == 2

    def test_the_default_temperature_counts_when_it_is_greedy(
        self, service: ModelService, repository: FakeModelRepository, cache: LruResponseCache
    ) -> None:
        greedy_by_default = GenerationLimits(max_new_tokens=10, default_temperature=0.0, max_generation_time_s=30.0)
        use_case = GenerateTextUseCase(service, repository, PromptBuilder(SYSTEM_PROMPT), greedy_by_default, cache=cache)
        load(service)

        run(use_case(GenerateText("Hello?")))
        answer = run(use_case(GenerateText("Hello?")))

        assert answer.cached and len(repository.generations) == 1

    def test_different_requests_get_their_own_answers(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)

        answers = [
            run(cached_generate_text(command))
            for command in (
                GenerateText("Is this spam?", temperature=0.0),
                GenerateText("Is this spam?", ["Buy now!"], temperature=0.0),
                GenerateText("Is this spam?", temperature=0.0, max_length=3),
                GenerateText("Is this spam?", temperature=0.0, model_id=TEST_MODEL_ID),
            )
        ]

        assert not any(answer.cached for answer in answers)
        assert len(repository.generations) == 4

    def test_raw_completions_of_different_texts_get_their_own_answers(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)

        once, twice = (
            run(cached_generate_text(CompletePrompt(prompt=Prompt.raw(text), temperature=0.0)))
            for text in ("Once upon a time", "Twice upon a time")
        )

        assert not twice.cached and (once.text, twice.text) == ("Once upon a time", "Twice upon a time")

    def test_a_failed_generation_is_not_cached(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository,
        cache: LruResponseCache,
    ) -> None:
        load(service)
        repository.fail_next_generations(GenerationError)
        command = GenerateText("Is this post spam?", temperature=0.0)

        with pytest.raises(GenerationError):
            run(cached_generate_text(command))
        assert len(cache) == 0

        answer = run(cached_generate_text(command))
        assert not answer.cached and len(repository.generations) == 1 and len(cache) == 1

    def test_an_answer_generated_after_loading_the_model_is_cached(
        self, cached_generate_text: GenerateTextUseCase, repository: FakeModelRepository
    ) -> None:
        command = GenerateText("Is this post spam?", temperature=0.0)

        first = run(cached_generate_text(command))  # the model is not loaded: loaded, then generated
        second = run(cached_generate_text(command))

        assert repository.is_loaded(DEFAULT_MODEL_ID)
        assert not first.cached and second.cached and len(repository.generations) == 1

    def test_a_stream_stores_its_answer_and_a_cached_answer_streams_as_one_piece(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        command = GenerateText("What is the capital of France?", temperature=0.0)

        generated = streamed(cached_generate_text, command)
        from_cache = streamed(cached_generate_text, command)

        assert len(generated) > 2 and len(repository.generations) == 1
        final = generated[-1]
        assert not final.cached and from_cache == [final.text, final.from_cache()]

    def test_a_streamed_request_is_answered_from_what_a_plain_request_stored(
        self, cached_generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        command = GenerateText("What is the capital of France?", temperature=0.0)

        answer = run(cached_generate_text(command))
        items = streamed(cached_generate_text, command)

        assert items == [answer.text, answer.from_cache()]
        assert len(repository.generations) == 1

    def test_without_a_cache_every_request_generates(
        self, generate_text: GenerateTextUseCase, service: ModelService, repository: FakeModelRepository
    ) -> None:
        load(service)
        command = GenerateText("Is this post spam?", temperature=0.0)

        answers = [run(generate_text(command)) for _ in range(2)]

        assert len(repository.generations) == 2 and not any(answer.cached for answer in answers)
