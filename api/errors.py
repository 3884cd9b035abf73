"""One table from error kinds to HTTP statuses; every error body is `{"error", "error_type"}`, or on the
OpenAI-compatible routes OpenAI's `{"error": {"message", "type", "param", "code"}}` with the kind as its code."""

from __future__ import annotations

import logging
import math

from starlette.responses import JSONResponse

from domain import ModelServiceError
from metrics import ERRORS, bounded

logger = logging.getLogger(__name__)

STATUS_BY_ERROR_TYPE = {
    "validation_error": 422,
    "unauthorized": 401,
    "external_model": 400,
    "payload_too_large": 413,
    "model_not_found": 404,
    "model_not_loaded": 503,
    "model_unloading": 503,
    "device_not_available": 503,
    "insufficient_memory": 507,
    "overloaded": 429,
    "shutting_down": 503,
    "engine_unavailable": 503,
    "provider_unavailable": 503,
    "provider_error": 502,
    "generation_timeout": 504,
    "generation_error": 500,
    "model_service_error": 500,
    "internal_error": 500,
    "client_disconnected": 499,
}
for _error_type in STATUS_BY_ERROR_TYPE:  # every known type shows on /metrics from the start, at 0
    ERRORS.labels(error_type=_error_type)


# How long a refused client should wait where the engine gives no estimate: about one short generation.
RETRY_AFTER_S = 1
RETRY_LATER = {"overloaded", "shutting_down", "engine_unavailable", "provider_unavailable"}


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; the work was cancelled."""


def count_error(error_type: str) -> None:
    ERRORS.labels(error_type=bounded(error_type, STATUS_BY_ERROR_TYPE)).inc()


def _retry_headers(error_type: str, retry_after_s: float | None = None) -> dict[str, str] | None:
    """Retry-After in whole seconds (HTTP's unit), from the engine's estimate where it gave one."""
    if error_type not in RETRY_LATER:
        return None
    return {"Retry-After": str(max(RETRY_AFTER_S, math.ceil(retry_after_s or 0)))}


def error_response(message: str, error_type: str, retry_after_s: float | None = None, **extra) -> JSONResponse:
    count_error(error_type)
    body = {"error": message, "error_type": error_type, **extra}
    headers = _retry_headers(error_type, retry_after_s)
    return JSONResponse(body, status_code=STATUS_BY_ERROR_TYPE[error_type], headers=headers)


def openai_error_body(message: str, error_type: str, param: str | None = None) -> dict[str, dict[str, str | None]]:
    status = STATUS_BY_ERROR_TYPE[error_type]
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": error_type}}


def openai_error_response(
    message: str, error_type: str, param: str | None = None, retry_after_s: float | None = None
) -> JSONResponse:
    count_error(error_type)
    body = openai_error_body(message, error_type, param)
    headers = _retry_headers(error_type, retry_after_s)
    return JSONResponse(body, status_code=STATUS_BY_ERROR_TYPE[error_type], headers=headers)


def error_body(error: Exception) -> dict[str, str]:
    if isinstance(error, ModelServiceError):
        return {"error": error.message, "error_type": error.error_type}
    if isinstance(error, ClientDisconnected):  # nobody reads it; the status shows in the access log
        return {"error": str(error), "error_type": "client_disconnected"}
    logger.exception("unexpected error", exc_info=error)
    return {"error": f"internal error: {type(error).__name__}; see the service log", "error_type": "internal_error"}


def response_for(error: Exception) -> JSONResponse:
    body = error_body(error)
    return error_response(body["error"], body["error_type"], getattr(error, "retry_after_s", None))
