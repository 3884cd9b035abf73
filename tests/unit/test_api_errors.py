"""The HTTP error table: every domain error kind has a status, and every error body is {error, error_type}."""

from __future__ import annotations

import json
import logging

import pytest

from api.errors import STATUS_BY_ERROR_TYPE, error_response, response_for
from domain import ModelNotFoundError, ModelServiceError
from domain.errors import ERROR_KINDS


def body_of(response) -> dict:
    return json.loads(response.body)


@pytest.mark.parametrize("error_type", sorted(ERROR_KINDS))
def test_every_domain_error_type_has_a_status(error_type: str) -> None:
    assert error_type in STATUS_BY_ERROR_TYPE


@pytest.mark.parametrize(
    "error_type, status",
    [
        ("validation_error", 422),
        ("unauthorized", 401),
        ("model_not_found", 404),
        ("model_not_loaded", 503),
        ("model_unloading", 503),
        ("overloaded", 429),
        ("external_model", 400),
        ("provider_error", 502),
        ("provider_unavailable", 503),
        ("device_not_available", 503),
        ("insufficient_memory", 507),
        ("generation_timeout", 504),
        ("generation_error", 500),
        ("payload_too_large", 413),
        ("model_service_error", 500),
        ("internal_error", 500),
    ],
)
def test_error_type_maps_to_its_status(error_type: str, status: int) -> None:
    assert STATUS_BY_ERROR_TYPE[error_type] == status


@pytest.mark.parametrize("error_type, kind", sorted(ERROR_KINDS.items()))
def test_response_for_a_domain_error_has_its_status_and_body(error_type: str, kind: type[ModelServiceError]) -> None:
    response = response_for(kind("what went wrong"))

    assert response.status_code == STATUS_BY_ERROR_TYPE[error_type]
    assert body_of(response) == {"error": "what went wrong", "error_type": error_type}
    assert response.headers["content-type"] == "application/json"


def test_response_for_model_not_found_is_404_with_the_message() -> None:
    response = response_for(ModelNotFoundError.for_id("nope", ["alpha"]))

    assert response.status_code == 404
    assert "available: alpha" in body_of(response)["error"]


def test_response_for_an_unexpected_exception_is_500_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = response_for(ValueError("secret detail"))

    assert response.status_code == 500
    body = body_of(response)
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == "internal_error"
    assert "ValueError" in body["error"]
    assert "secret detail" not in body["error"]  # details go to the log, not to the client
    assert "secret detail" in caplog.text


def test_error_response_adds_extra_fields_to_the_body() -> None:
    response = error_response("too big", "payload_too_large", limit=10)

    assert response.status_code == 413
    assert body_of(response) == {"error": "too big", "error_type": "payload_too_large", "limit": 10}
