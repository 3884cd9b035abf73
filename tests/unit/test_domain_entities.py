"""Model, Generation, Prompt, GenerationLimits, PromptBuilder and the catalog: values and their wire forms."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from domain import (
    CatalogEntry,
    ChatMessage,
    Generation,
    GenerationLimits,
    GenerationParams,
    InvalidRequestError,
    Model,
    ModelNotFoundError,
    Prompt,
    PromptBuilder,
    TokenLogprob,
)
from domain.prompt import DEFAULT_SYSTEM_PROMPT
from tests.unit.fakes import InMemoryCatalog


def a_model(**changes) -> Model:
    fields = dict(
        id="test-model",
        name="test-model:v1",
        type="causal-lm",
        device="cpu",
        is_loaded=True,
        path="/models/test-model/v1",
        created_at=datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc),
        updated_at=datetime(2024, 1, 2, 8, 30, 15, 123456, tzinfo=timezone.utc),
        metadata={"version": "v1", "memory_mb": 270.5},
    )
    return Model(**{**fields, **changes})


def a_generation() -> Generation:
    return Generation(
        text="an answer",
        model_id="test-model",
        finish_reason="length",
        prompt_tokens=12,
        completion_tokens=10,
        generation_time_s=0.25,
        max_new_tokens=10,
        temperature=0.1,
    )


class TestModel:
    def test_round_trips_through_a_dict(self) -> None:
        model = a_model()

        assert Model.from_dict(model.to_dict()) == model

    def test_round_trips_through_json(self) -> None:
        model = a_model()

        assert Model.from_dict(json.loads(json.dumps(model.to_dict()))) == model

    def test_dict_has_iso_timestamps(self) -> None:
        data = a_model().to_dict()

        assert data["created_at"] == "2024-01-01T12:00:00+00:00"
        assert data["updated_at"] == "2024-01-02T08:30:15.123456+00:00"

    def test_round_trips_without_metadata(self) -> None:
        model = a_model(metadata=None)

        assert Model.from_dict(model.to_dict()) == model

    def test_from_dict_fills_in_missing_metadata_with_none(self) -> None:
        data = a_model().to_dict()
        del data["metadata"]

        assert Model.from_dict(data).metadata is None

    def test_from_dict_leaves_its_argument_alone(self) -> None:
        data = a_model().to_dict()
        before = dict(data)

        Model.from_dict(data)

        assert data == before


class TestGeneration:
    def test_round_trips_through_a_dict(self) -> None:
        generation = a_generation()

        assert Generation.from_dict(generation.to_dict()) == generation

    def test_dict_has_every_field(self) -> None:
        assert a_generation().to_dict() == {
            "text": "an answer",
            "model_id": "test-model",
            "finish_reason": "length",
            "prompt_tokens": 12,
            "completion_tokens": 10,
            "generation_time_s": 0.25,
            "max_new_tokens": 10,
            "temperature": 0.1,
            "time_to_first_token_s": 0.0,
            "cached_prompt_tokens": 0,
            "cached": False,
            "logprobs": None,
        }

    def test_round_trips_with_its_logprobs(self) -> None:
        top = TokenLogprob("No", (78, 111), -0.4)
        generation = replace(a_generation(), logprobs=(TokenLogprob("Yes", (89, 101, 115), -1.1, (top,)),))

        assert Generation.from_dict(json.loads(json.dumps(generation.to_dict()))) == generation

    def test_from_cache_marks_it_cached_with_no_generation_time(self) -> None:
        generation = a_generation()

        served = generation.from_cache()

        assert served.cached and served.generation_time_s == 0.0 and served.time_to_first_token_s == 0.0
        assert served.text == generation.text and served.completion_tokens == generation.completion_tokens


class TestPrompt:
    def test_round_trips_through_a_list(self) -> None:
        prompt = Prompt((ChatMessage("system", "be brief"), ChatMessage("user", "hi")))

        assert Prompt.from_list(prompt.to_list()) == prompt

    def test_list_form_is_role_and_content_dicts(self) -> None:
        prompt = Prompt((ChatMessage("system", "be brief"), ChatMessage("user", "hi")))

        assert prompt.to_list() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

    def test_empty_prompt_round_trips(self) -> None:
        assert Prompt.from_list([]) == Prompt(())


class TestPromptBuilder:
    def test_starts_with_the_system_prompt(self) -> None:
        prompt = PromptBuilder("Be terse.").build("q", [])

        assert prompt.messages == (ChatMessage("system", "Be terse."), ChatMessage("user", "q"))

    def test_uses_the_default_system_prompt_when_given_none(self) -> None:
        prompt = PromptBuilder().build("q", [])

        assert prompt.messages[0] == ChatMessage("system", DEFAULT_SYSTEM_PROMPT)

    def test_an_empty_system_prompt_leaves_only_the_user_message(self) -> None:
        prompt = PromptBuilder("").build("q", [])

        assert prompt.messages == (ChatMessage("user", "q"),)

    def test_numbers_the_passages_and_puts_the_question_last(self) -> None:
        prompt = PromptBuilder("").build("Why?", ["one", "two"])

        assert prompt.messages[-1].content == "Why?\n\nContext:\n[1] one\n[2] two"

    def test_strips_passages_and_drops_blank_ones(self) -> None:
        prompt = PromptBuilder("").build("Why?", ["  one\n", "", " \t ", "two"])

        assert prompt.messages[-1].content == "Why?\n\nContext:\n[1] one\n[2] two"

    def test_is_the_query_alone_without_passages(self) -> None:
        assert PromptBuilder("").build("Why?", []).messages[-1].content == "Why?"


class TestGenerationLimits:
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30.0)

    def test_fills_what_the_request_leaves_out(self) -> None:
        assert self.limits.params_for(None, None) == GenerationParams(
            max_new_tokens=10, temperature=0.1, timeout_s=30.0
        )

    @pytest.mark.parametrize("max_length, expected", [(1, 1), (9, 9), (10, 10), (11, 10), (5000, 10)])
    def test_caps_max_length_at_max_new_tokens(self, max_length: int, expected: int) -> None:
        assert self.limits.params_for(max_length, None).max_new_tokens == expected

    def test_keeps_a_zero_temperature(self) -> None:
        params = self.limits.params_for(None, 0.0)

        assert params.temperature == 0.0
        assert params.greedy is True

    def test_a_positive_temperature_is_not_greedy(self) -> None:
        assert self.limits.params_for(None, 0.5).greedy is False


class TestCatalog:
    def test_gets_a_known_entry(self) -> None:
        entry = InMemoryCatalog("a-model").get("a-model")

        assert isinstance(entry, CatalogEntry)
        assert entry.model_id == "a-model"

    def test_lists_model_ids_sorted(self) -> None:
        assert InMemoryCatalog("zeta", "alpha", "mid").model_ids() == ["alpha", "mid", "zeta"]

    def test_an_unknown_id_is_not_found_with_the_sorted_available_ids(self) -> None:
        with pytest.raises(ModelNotFoundError) as raised:
            InMemoryCatalog("zeta", "alpha").get("nope")

        assert "model_id 'nope' is not in the model store (available: alpha, zeta)" in raised.value.message

    def test_not_found_says_how_to_import_the_model(self) -> None:
        with pytest.raises(ModelNotFoundError) as raised:
            InMemoryCatalog("alpha").get("nope")

        assert "python scripts/import_model.py --from /path/to/nope --name nope" in raised.value.message

    def test_not_found_in_an_empty_catalog_says_none_are_available(self) -> None:
        with pytest.raises(ModelNotFoundError) as raised:
            InMemoryCatalog().get("nope")

        assert "(available: none)" in raised.value.message


@pytest.mark.parametrize(
    ("max_length", "temperature", "fragment"),
    [(0, None, "max_length: must be at least 1, got 0"), (None, 2.5, "temperature: must be between 0 and 2, got 2.5")],
)
def test_limits_refuse_values_no_schema_should_have_let_through(max_length, temperature, fragment):
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    with pytest.raises(InvalidRequestError, match=fragment):
        limits.params_for(max_length, temperature)


def test_a_request_timeout_lowers_the_deadline_but_never_raises_it():
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    assert limits.params_for(None, None, 5).timeout_s == 5
    assert limits.params_for(None, None, 300).timeout_s == 30
    assert limits.params_for(None, None).timeout_s == 30
    with pytest.raises(InvalidRequestError, match="timeout: must be more than 0 seconds, got 0"):
        limits.params_for(None, None, 0)


@pytest.mark.parametrize(
    "timeout, expected",
    [(5, (5, "timeout")), (30, (30, "timeout")), (300, (30, "MAX_GENERATION_TIME")), (None, (30, "MAX_GENERATION_TIME"))],
)
def test_a_deadline_knows_whether_the_callers_timeout_or_max_generation_time_set_it(timeout, expected):
    """A 504 names the limit that ran out: the caller's own `timeout`, or the server's setting."""
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    params = limits.params_for(None, None, timeout)
    assert (params.timeout_s, params.timeout_by) == expected
    classify = limits.classify_params(["yes", "no"], timeout, None)
    assert (classify.timeout_s, classify.timeout_by) == expected


def test_a_raw_prompt_has_text_and_no_messages():
    assert Prompt.raw("Once upon a time") == Prompt((), "Once upon a time")
    assert Prompt.from_list([{"role": "user", "content": "hi"}]).text is None


@pytest.mark.parametrize(
    "prompt", [Prompt.raw("Once upon a time"), Prompt.from_list([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])]
)
def test_a_prompt_and_its_params_cross_to_the_engine_through_json_unchanged(prompt):
    params = GenerationParams(12, 0.7, 30.0, top_p=0.9, stop=("\n", "END"), seed=-3)

    crossed_prompt, crossed_params = json.loads(json.dumps([prompt.to_dict(), params.to_dict()]))

    assert Prompt.from_dict(crossed_prompt) == prompt
    assert GenerationParams.from_dict(crossed_params) == params


def test_min_tokens_is_at_most_the_length_asked_for_and_capped_with_it():
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    assert limits.params_for(8, None, min_tokens=8).min_new_tokens == 8
    assert limits.params_for(50, None, min_tokens=40).min_new_tokens == 10  # MAX_NEW_TOKENS caps both
    assert limits.params_for(None, None).min_new_tokens == 0
    with pytest.raises(InvalidRequestError, match=r"min_tokens: must be between 0 and max_length \(max_tokens\), 5, got 6"):
        limits.params_for(5, None, min_tokens=6)
    with pytest.raises(InvalidRequestError, match="min_tokens: must be between 0 and MAX_NEW_TOKENS, the default max_length, 10, got 11"):
        limits.params_for(None, None, min_tokens=11)


def test_ignore_eos_passes_through_and_is_off_by_default():
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    assert limits.params_for(None, None, ignore_eos=True).ignore_eos is True
    assert limits.params_for(None, None).ignore_eos is False


def test_limits_pass_top_p_stop_and_seed_through_with_neutral_defaults():
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    params = limits.params_for(None, 0.8, top_p=0.5, stop=("\n", "END"), seed=-7)
    assert (params.top_p, params.stop, params.seed) == (0.5, ("\n", "END"), -7)
    default = limits.params_for(None, None)
    assert (default.top_p, default.stop, default.seed) == (1.0, (), None)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"top_p": 1.5}, "top_p: must be between 0 and 1, got 1.5"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop: at most 4 stop strings, got 5"),
        ({"stop": ("",)}, "stop: each stop string must be 1 to 256 characters, got ''"),
        ({"stop": ("x" * 257,)}, "stop: each stop string must be 1 to 256 characters"),
        ({"seed": 2**63}, f"seed: must be a signed 64-bit integer, got {2**63}"),
    ],
)
def test_limits_refuse_sampling_options_out_of_bounds(options, fragment):
    limits = GenerationLimits(max_new_tokens=10, default_temperature=0.1, max_generation_time_s=30)
    with pytest.raises(InvalidRequestError) as raised:
        limits.params_for(None, None, **options)
    assert fragment in raised.value.message
