"""What a generation is asked for and what it gives back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import InvalidRequestError

MAX_TEMPERATURE = 2.0
# OpenAI's bounds: at most 4 stop strings, and a seed is a signed 64-bit integer.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Chat messages for the model's chat template, or `text` to continue as it is (a raw completion)."""

    messages: tuple[ChatMessage, ...]
    text: str | None = None

    @classmethod
    def raw(cls, text: str) -> Prompt:
        return cls((), text)

    def to_list(self) -> list[dict[str, str]]:
        return [asdict(message) for message in self.messages]

    @classmethod
    def from_list(cls, messages: list[dict[str, str]]) -> Prompt:
        return cls(tuple(ChatMessage(**message) for message in messages))

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.to_list(), "text": self.text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prompt:
        return cls(cls.from_list(data["messages"]).messages, data["text"])


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    timeout_s: float
    top_p: float = 1.0  # sample from the smallest set of likeliest tokens whose probability reaches top_p
    stop: tuple[str, ...] = ()  # the text ends before the first of these, with finish reason "stop"
    seed: int | None = None  # the same seed gives the same sampled text
    min_new_tokens: int = 0  # no end of sequence before this many tokens (vLLM's min_tokens)
    ignore_eos: bool = False  # generate past an end of sequence, up to max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """The params as to_dict gave them, after a trip through JSON (which turns `stop` into a list)."""
        return cls(**{**data, "stop": tuple(data.get("stop", ()))})

    @property
    def deterministic(self) -> bool:
        """The same request always gets the same text, so its answer may be cached: greedy, or sampled
        with an explicit seed."""
        return self.greedy or self.seed is not None


@dataclass(frozen=True)
class GenerationLimits:
    """The operator's bounds: MAX_NEW_TOKENS caps a request, the defaults fill what it leaves out."""

    max_new_tokens: int
    default_temperature: float
    max_generation_time_s: float

    def params_for(
        self,
        max_length: int | None,
        temperature: float | None,
        timeout_s: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        min_tokens: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerationParams:
        if max_length is not None and max_length < 1:
            raise InvalidRequestError(f"max_length: must be at least 1, got {max_length}")
        if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(f"temperature: must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}")
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidRequestError(f"timeout: must be more than 0 seconds, got {timeout_s}")
        if top_p is not None and not 0.0 <= top_p <= 1.0:
            raise InvalidRequestError(f"top_p: must be between 0 and 1, got {top_p}")
        _check_stop(stop)
        if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
            raise InvalidRequestError(f"seed: must be a signed 64-bit integer, got {seed}")
        requested = self.max_new_tokens if max_length is None else max_length
        if min_tokens is not None and not 0 <= min_tokens <= requested:
            limit = "max_length (max_tokens)" if max_length is not None else "MAX_NEW_TOKENS, the default max_length"
            raise InvalidRequestError(f"min_tokens: must be between 0 and {limit}, {requested}, got {min_tokens}")
        max_new_tokens = min(requested, self.max_new_tokens)
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=self.default_temperature if temperature is None else temperature,
            timeout_s=self.max_generation_time_s if timeout_s is None else min(timeout_s, self.max_generation_time_s),
            top_p=1.0 if top_p is None else top_p,
            stop=tuple(stop),
            seed=seed,
            min_new_tokens=min(min_tokens or 0, max_new_tokens),
            ignore_eos=ignore_eos,
        )


def _check_stop(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for text in stop:
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise InvalidRequestError(f"stop: each stop string must be 1 to {MAX_STOP_CHARS} characters, got {text!r}")


@dataclass(frozen=True)
class Generation:
    text: str
    model_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    generation_time_s: float
    max_new_tokens: int
    temperature: float
    time_to_first_token_s: float = 0.0
    cached_prompt_tokens: int = 0
    cached: bool = False  # served from the response cache: nothing was generated for this request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def from_cache(self) -> Generation:
        return replace(self, cached=True, generation_time_s=0.0, time_to_first_token_s=0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        return cls(**data)
