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
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
# Lower runs first (vLLM's convention); the names are the usual two classes of traffic.
PRIORITY_NAMES = {"interactive": -10, "normal": 0, "batch": 10}
MIN_PRIORITY, MAX_PRIORITY = -100, 100
GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class GuidedDecoding:
    """Output constrained to a grammar: a JSON schema (as JSON text), any JSON object (value ""), a
    regular expression, or one of a list of choices (as a JSON list of strings)."""

    kind: str
    value: str
    field: str  # the request field that asked for it, which its errors name

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability, in OpenAI's terms: its text, its UTF-8 bytes (a token may hold part
    of a character) and the likeliest tokens at its position, likeliest first."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLogprob:
        top = tuple(cls.from_dict(item) for item in data.get("top", ()))
        return cls(data["token"], tuple(data["bytes"]), data["logprob"], top)


class TextDelta(str):
    """A piece of generated text, with the log probabilities of the tokens that made it when the
    request asked for them. It is a str, so callers that want only the text need nothing else."""

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> TextDelta:
        delta = super().__new__(cls, text)
        delta.logprobs = logprobs
        return delta


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


# Which limit a request's deadline is (GenerationLimits.deadline): its 504 names that one.
REQUEST_TIMEOUT = "timeout"
MAX_GENERATION_TIME = "MAX_GENERATION_TIME"


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
    logprobs: int | None = None  # None: none; k: each token's log probability and the k likeliest alternatives
    priority: int = 0  # lower runs first
    guided: GuidedDecoding | None = None
    timeout_by: str = MAX_GENERATION_TIME  # which limit timeout_s is: the caller's `timeout`, or the server's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """The params as to_dict gave them, after a trip through JSON (which turns tuples into lists)."""
        guided = data.get("guided")
        return cls(
            **{**data, "stop": tuple(data.get("stop", ())), "guided": guided and GuidedDecoding(**guided)}
        )

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

    def classify_params(
        self,
        labels: list[str] | tuple[str, ...],
        timeout_s: float | None,
        priority: int | str | None,
        field: str = "labels",
    ) -> ClassifyParams:
        timeout, timeout_by = self.deadline(timeout_s)
        return ClassifyParams(check_labels(labels, field), timeout, priority_value(priority), field, timeout_by)

    def deadline(self, timeout_s: float | None) -> tuple[float, str]:
        """The seconds a request may run and which limit that is: its own `timeout` where it is the
        shorter, else MAX_GENERATION_TIME."""
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidRequestError(f"timeout: must be more than 0 seconds, got {timeout_s}")
        if timeout_s is not None and timeout_s <= self.max_generation_time_s:
            return timeout_s, REQUEST_TIMEOUT
        return self.max_generation_time_s, MAX_GENERATION_TIME

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
        logprobs: int | None = None,
        priority: int | str | None = None,
        guided: GuidedDecoding | None = None,
    ) -> GenerationParams:
        if max_length is not None and max_length < 1:
            raise InvalidRequestError(f"max_length: must be at least 1, got {max_length}")
        if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(f"temperature: must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}")
        timeout, timeout_by = self.deadline(timeout_s)
        if top_p is not None and not 0.0 <= top_p <= 1.0:
            raise InvalidRequestError(f"top_p: must be between 0 and 1, got {top_p}")
        _check_stop(stop)
        if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
            raise InvalidRequestError(f"seed: must be a signed 64-bit integer, got {seed}")
        requested = self.max_new_tokens if max_length is None else max_length
        if min_tokens is not None and not 0 <= min_tokens <= requested:
            limit = "max_length (max_tokens)" if max_length is not None else "MAX_NEW_TOKENS, the default max_length"
            raise InvalidRequestError(f"min_tokens: must be between 0 and {limit}, {requested}, got {min_tokens}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
        if guided is not None:
            _check_guided(guided, min_tokens, ignore_eos)
        max_new_tokens = min(requested, self.max_new_tokens)
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=self.default_temperature if temperature is None else temperature,
            timeout_s=timeout,
            top_p=1.0 if top_p is None else top_p,
            stop=tuple(stop),
            seed=seed,
            min_new_tokens=min(min_tokens or 0, max_new_tokens),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            priority=priority_value(priority),
            guided=guided,
            timeout_by=timeout_by,
        )


def priority_value(priority: int | str | None) -> int:
    """A request's priority as the scheduler orders it: a name from PRIORITY_NAMES or an integer
    from MIN_PRIORITY to MAX_PRIORITY, lower first; None is "normal"."""
    if priority is None:
        return PRIORITY_NAMES["normal"]
    if isinstance(priority, str):
        if priority not in PRIORITY_NAMES:
            raise InvalidRequestError(
                f"priority: must be one of {sorted(PRIORITY_NAMES)} or an integer from {MIN_PRIORITY} to "
                f"{MAX_PRIORITY}, got {priority!r}"
            )
        return PRIORITY_NAMES[priority]
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidRequestError(
            f"priority: must be one of {sorted(PRIORITY_NAMES)} or an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, "
            f"got {priority!r}"
        )
    return priority


def _check_guided(guided: GuidedDecoding, min_tokens: int | None, ignore_eos: bool) -> None:
    """A grammar ends the text when it is complete: an end of sequence it must allow there."""
    if guided.kind not in GUIDED_KINDS:
        raise InvalidRequestError(f"{guided.field}: must be one of {GUIDED_KINDS}, got {guided.kind!r}")
    if ignore_eos:
        raise InvalidRequestError(f"ignore_eos: cannot be true with structured output ({guided.field})")
    if min_tokens:
        raise InvalidRequestError(f"min_tokens: must be 0 with structured output ({guided.field}), got {min_tokens}")


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
    logprobs: tuple[TokenLogprob, ...] | None = None  # each generated token's, when the request asked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def from_cache(self) -> Generation:
        return replace(self, cached=True, generation_time_s=0.0, time_to_first_token_s=0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        logprobs = data.get("logprobs")
        return cls(**{**data, "logprobs": None if logprobs is None else tuple(map(TokenLogprob.from_dict, logprobs))})


MAX_LABELS = 64
MAX_LABEL_CHARS = 200
MAX_LABEL_TOKENS = 16  # a label is an answer of a few words; scoring it costs a prompt of this many more tokens


@dataclass(frozen=True)
class ClassifyParams:
    labels: tuple[str, ...]  # the allowed answers, in the caller's order
    timeout_s: float
    priority: int = 0
    field: str = "labels"  # the request field that holds the labels, which its errors name
    timeout_by: str = MAX_GENERATION_TIME  # as GenerationParams.timeout_by

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifyParams:
        return cls(**{**data, "labels": tuple(data["labels"])})


@dataclass(frozen=True)
class Decision:
    """The most probable of the allowed labels, and every label's probability normalized over the labels."""

    label: str
    probabilities: dict[str, float]  # in the request's label order
    model_id: str
    prompt_tokens: int
    cached_prompt_tokens: int
    decision_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(**data)


def check_labels(labels: list[str] | tuple[str, ...], field: str = "labels") -> tuple[str, ...]:
    """1 to MAX_LABELS distinct, non-empty labels of at most MAX_LABEL_CHARS characters."""
    if not 1 <= len(labels) <= MAX_LABELS:
        raise InvalidRequestError(f"{field}: must hold 1 to {MAX_LABELS} labels, got {len(labels)}")
    for index, label in enumerate(labels):
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise InvalidRequestError(f"{field}.{index}: must be 1 to {MAX_LABEL_CHARS} characters, got {label!r}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise InvalidRequestError(f"{field}: each label must be distinct, got {repeated[0]!r} more than once")
    return tuple(labels)
