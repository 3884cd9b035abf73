"""The errors the service can answer with. Each kind has a stable `error_type` that callers match on."""

from __future__ import annotations


class ModelServiceError(Exception):
    error_type = "model_service_error"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # when a refused caller may expect room, where it is known

    def to_dict(self) -> dict[str, str | float]:
        found: dict[str, str | float] = {"error": self.message, "error_type": self.error_type}
        if self.retry_after_s is not None:
            found["retry_after_s"] = self.retry_after_s
        return found


class InvalidRequestError(ModelServiceError):
    """The request breaks a limit that only the engine can check (the prompt against the context window)."""

    error_type = "validation_error"


class ModelNotFoundError(ModelServiceError):
    error_type = "model_not_found"

    @classmethod
    def for_id(cls, model_id: str, available: list[str]) -> ModelNotFoundError:
        listed = ", ".join(available) if available else "none"
        return cls(
            f"model_id {model_id!r} is not in the model store (available: {listed}). Import it with "
            f"`python scripts/import_model.py --from /path/to/{model_id} --name {model_id}`"
        )


class ModelNotLoadedError(ModelServiceError):
    error_type = "model_not_loaded"

    @classmethod
    def for_id(cls, model_id: str) -> ModelNotLoadedError:
        return cls(f"model {model_id!r} is not loaded; load it with POST /load-model {{\"model_id\": \"{model_id}\"}}")


class ModelUnloadingError(ModelServiceError):
    """The model was unloaded while this request was waiting or generating."""

    error_type = "model_unloading"


class DeviceNotAvailableError(ModelServiceError):
    error_type = "device_not_available"


class InsufficientMemoryError(ModelServiceError):
    """Not enough memory to load a model. Not called MemoryError, so that it does not shadow the builtin."""

    error_type = "insufficient_memory"


def deadline_name(by_own_timeout: bool) -> str:
    """What a request's deadline is called in a message: the caller's `timeout`, or the server's limit."""
    return "its timeout" if by_own_timeout else "MAX_GENERATION_TIME"


class OverloadedError(ModelServiceError):
    """More requests are queued for the model than the queue holds, or the queue would make this one
    finish after its deadline: try again shortly."""

    error_type = "overloaded"

    @classmethod
    def past_deadline(cls, model_id: str, expected_s: float, allowed_s: float, by_own_timeout: bool) -> OverloadedError:
        limit = deadline_name(by_own_timeout)
        return cls(
            f"{model_id!r} is busy: behind the requests ahead of it, this one would take about {expected_s:.1f}s, "
            f"past {limit} ({allowed_s:.1f}s left); retry later",
            retry_after_s=expected_s - allowed_s,
        )

    @classmethod
    def queue_full(cls, model_id: str, waiting: int, max_queue_size: int) -> OverloadedError:
        return cls(
            f"{waiting} requests are already queued for {model_id!r} (MAX_QUEUE_SIZE={max_queue_size}) behind a "
            "full batch; retry shortly"
        )


class EngineUnavailableError(ModelServiceError):
    """The generation engine cannot be reached: it is restarting after a crash, or shutting down."""

    error_type = "engine_unavailable"


class ExternalModelError(ModelServiceError):
    """A load or unload of an id that names no model of this engine: an external model, served by its
    provider, or a fallback chain."""

    error_type = "external_model"


class ProviderError(ModelServiceError):
    """The provider of an external model failed to answer: it erred (5xx), could not be reached, broke
    off its answer, or refused this service's credentials. The message names the provider."""

    error_type = "provider_error"


class ProviderUnavailableError(ModelServiceError):
    """The provider's circuit is open after repeated failures: it is not called until its cool-down ends."""

    error_type = "provider_unavailable"


class GenerationError(ModelServiceError):
    error_type = "generation_error"


class GenerationTimeoutError(GenerationError):
    error_type = "generation_timeout"


ERROR_KINDS: dict[str, type[ModelServiceError]] = {
    kind.error_type: kind
    for kind in (
        ModelServiceError,
        InvalidRequestError,
        ModelNotFoundError,
        ModelNotLoadedError,
        ModelUnloadingError,
        DeviceNotAvailableError,
        InsufficientMemoryError,
        OverloadedError,
        EngineUnavailableError,
        ExternalModelError,
        ProviderError,
        ProviderUnavailableError,
        GenerationError,
        GenerationTimeoutError,
    )
}


def error_from_type(error_type: str, message: str, retry_after_s: float | None = None) -> ModelServiceError:
    """Rebuilds an error that crossed a process boundary as `{"error_type", "error"}`."""
    return ERROR_KINDS.get(error_type, ModelServiceError)(message, retry_after_s)


def raise_if_error(message: dict) -> None:
    """Raises the error a message carries, if it is one (see ModelServiceError.to_dict)."""
    if "error_type" in message:
        raise error_from_type(message["error_type"], message["error"], message.get("retry_after_s"))
