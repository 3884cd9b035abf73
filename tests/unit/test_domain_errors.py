"""The domain's errors: stable error types, and rebuilding an error from its wire form."""

from __future__ import annotations

import pickle

import pytest

from domain import GenerationError, GenerationTimeoutError, ModelNotLoadedError, ModelServiceError, error_from_type
from domain.errors import ERROR_KINDS


@pytest.mark.parametrize("error_type, kind", sorted(ERROR_KINDS.items()))
def test_error_from_type_rebuilds_every_kind(error_type: str, kind: type[ModelServiceError]) -> None:
    error = error_from_type(error_type, "what went wrong")

    assert type(error) is kind
    assert error.error_type == error_type
    assert error.message == "what went wrong"
    assert str(error) == "what went wrong"


@pytest.mark.parametrize("error_type", ["no_such_type", "", "internal_error", "payload_too_large"])
def test_error_from_an_unknown_type_is_a_plain_model_service_error(error_type: str) -> None:
    error = error_from_type(error_type, "something")

    assert type(error) is ModelServiceError
    assert error.message == "something"


def test_every_error_kind_has_its_own_error_type() -> None:
    kinds = {kind for kind in ERROR_KINDS.values()}

    assert len(kinds) == len(ERROR_KINDS) == 14


def test_error_kinds_are_model_service_errors() -> None:
    assert all(issubclass(kind, ModelServiceError) for kind in ERROR_KINDS.values())


def test_a_timeout_is_a_generation_error() -> None:
    assert issubclass(GenerationTimeoutError, GenerationError)


def test_not_loaded_says_how_to_load_the_model() -> None:
    error = ModelNotLoadedError.for_id("test-model")

    assert error.message == (
        "model 'test-model' is not loaded; load it with POST /load-model {\"model_id\": \"test-model\"}"
    )


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS.values(), key=lambda kind: kind.error_type))
def test_errors_survive_pickling(kind: type[ModelServiceError]) -> None:
    error = pickle.loads(pickle.dumps(kind("boom")))

    assert type(error) is kind
    assert error.message == "boom"
