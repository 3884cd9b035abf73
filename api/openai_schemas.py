"""Request and response bodies of the OpenAI-compatible API (/v1), in OpenAI's shapes.

Unknown fields are refused (422, naming the field), as OpenAI itself refuses unrecognized arguments.
OpenAI parameters this service does not implement are accepted only at their neutral value
(`frequency_penalty: 0`, `logprobs: false`, ...), so a client that always sends them still works,
and one that asks for their effect learns that it is not there. `user` is accepted and unused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from domain import ChatMessage, CompletePrompt, Generation, Model, Prompt
from domain.generation import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, MIN_SEED

from .errors import STATUS_BY_ERROR_TYPE
from .schemas import IGNORE_EOS_DESCRIPTION, MAX_LENGTH_LIMIT, MIN_TOKENS_DESCRIPTION, no_nul

# OpenAI's "developer" role is the newer name of "system"; chat templates know only the latter.
TEMPLATE_ROLE = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Only:
    """Accepts a parameter that the service does not implement only at its neutral value (or null),
    and documents just that."""

    neutral: Any
    why: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        null = {"type": "null"}
        allowed = null if self.neutral is None else {"anyOf": [{"const": self.neutral}, null]}
        return {**allowed, "description": f"only {json.dumps(self.neutral)}: {self.why}"}

    def _check(self, value: Any) -> Any:
        if value is not None and value != self.neutral:
            raise ValueError(f"only {json.dumps(self.neutral)} is supported ({self.why}), got {json.dumps(value)}")
        return value


def _stop_list(value: Any) -> Any:
    if value is not None and not isinstance(value, (str, list)):
        raise ValueError(f"must be a string or a list of up to {MAX_STOP_STRINGS} strings, got {type(value).__name__}")
    return [value] if isinstance(value, str) else value


def _joined_text_parts(content: Any) -> Any:
    """Message content as a string: OpenAI also sends a list of `{"type": "text", "text"}` parts."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _single_prompt(prompt: Any) -> Any:
    if not isinstance(prompt, list):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise ValueError(
        f"must be a string or a list of one string (one prompt per request), got a list of {len(prompt)} items"
    )


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
STOP_STRING_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
StopStrings = Annotated[
    Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None,
    BeforeValidator(_stop_list),
    WithJsonSchema(
        {
            "anyOf": [
                STOP_STRING_SCHEMA,
                {"type": "array", "items": STOP_STRING_SCHEMA, "maxItems": MAX_STOP_STRINGS},
                {"type": "null"},
            ]
        }
    ),
]
TEXT_PART_SCHEMA = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
MessageContent = Annotated[
    str,
    BeforeValidator(_joined_text_parts),
    AfterValidator(no_nul),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART_SCHEMA}]}),
]
PromptText = Annotated[
    Annotated[str, Field(min_length=1)],
    BeforeValidator(_single_prompt),
    AfterValidator(no_nul),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
            ]
        }
    ),
]
MaxTokens = Annotated[int | None, Field(strict=True, ge=1, le=MAX_LENGTH_LIMIT)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = Field(False, strict=True, description="a last chunk, with no choices, carries the usage")


class GenerationRequest(Body):
    """What chat completions and completions share."""

    model: str = Field(min_length=1, max_length=256, description="a model id from GET /v1/models")
    max_tokens: MaxTokens = Field(
        None, description="new tokens to generate; capped by MAX_NEW_TOKENS, which is also the default"
    )
    temperature: float | None = Field(
        None, strict=True, ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy; default GENERATION_TEMPERATURE"
    )
    top_p: float | None = Field(None, strict=True, ge=0.0, le=1.0, description="nucleus sampling; default 1")
    stop: StopStrings = Field(None, description=f"up to {MAX_STOP_STRINGS} strings; the text ends before the first")
    seed: int | None = Field(
        None, strict=True, ge=MIN_SEED, le=MAX_SEED, description="the same seed gives the same sampled text"
    )
    n: Annotated[int | None, Field(strict=True), Only(1, "one choice per request")] = None
    stream: bool = Field(False, strict=True, description="server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted for compatibility; unused")
    frequency_penalty: Annotated[float | None, Field(strict=True), Only(0, "penalties are not implemented")] = None
    presence_penalty: Annotated[float | None, Field(strict=True), Only(0, "penalties are not implemented")] = None
    logit_bias: Annotated[dict[str, float] | None, Only({}, "logit bias is not implemented")] = None
    # vLLM's extra parameters, as its OpenAI client sends them in extra_body.
    min_tokens: int | None = Field(None, strict=True, ge=0, le=MAX_LENGTH_LIMIT, description=MIN_TOKENS_DESCRIPTION)
    ignore_eos: bool = Field(False, strict=True, description=IGNORE_EOS_DESCRIPTION)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def command(self, prompt: Prompt, max_tokens: int | None) -> CompletePrompt:
        return CompletePrompt(
            prompt=prompt,
            model_id=self.model,
            max_length=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )


class ChatMessageIn(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent
    name: str | None = Field(None, max_length=256, description="accepted for compatibility; unused")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens = Field(None, description="the newer name of max_tokens")
    logprobs: Annotated[bool | None, Field(strict=True), Only(False, "log probabilities are not returned")] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_token_limit(cls, max_completion_tokens: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if None not in (max_tokens, max_completion_tokens) and max_tokens != max_completion_tokens:
            raise ValueError(
                f"give this or max_tokens, not both with different values: got {max_completion_tokens}, "
                f"and max_tokens {max_tokens}"
            )
        return max_completion_tokens

    def to_command(self) -> CompletePrompt:
        messages = tuple(ChatMessage(TEMPLATE_ROLE[message.role], message.content) for message in self.messages)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.command(Prompt(messages), max_tokens)


class CompletionRequest(GenerationRequest):
    prompt: PromptText = Field(description="raw text that the model continues (no chat template)")
    echo: Annotated[bool | None, Field(strict=True), Only(False, "the prompt is not repeated")] = None
    best_of: Annotated[int | None, Field(strict=True), Only(1, "one candidate per request")] = None
    suffix: Annotated[str | None, Only(None, "insertion is not implemented")] = None
    logprobs: Annotated[int | None, Field(strict=True), Only(0, "log probabilities are not returned")] = None

    def to_command(self) -> CompletePrompt:
        return self.command(Prompt.raw(self.prompt), self.max_tokens)


# Responses.


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, generation: Generation) -> Usage:
        return cls(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=generation.cached_prompt_tokens),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Answer(BaseModel):
    """What a chat and a text completion share."""

    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str

    @classmethod
    def of(cls, model: Model, owner: str) -> ModelCard:
        return cls(id=model.id, created=int(model.created_at.timestamp()), owned_by=owner)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str = Field(description="what was refused and why: the field, the limit and the value")
    type: Literal["invalid_request_error", "rate_limit_error", "server_error"]
    param: str | None = Field(description="the request field at fault, where there is one")
    code: Literal[tuple(sorted(STATUS_BY_ERROR_TYPE))] | None = Field(  # type: ignore[valid-type]
        description="the error_type; null only for a path or method that does not exist"
    )


class OpenAIErrorResponse(BaseModel):
    """Every error on /v1, in OpenAI's shape."""

    error: OpenAIError
