"""Request bodies of the OpenAI-compatible API (/v1), in OpenAI's shapes (its answers: openai_answers.py).

Unknown fields are refused (422, naming the field), as OpenAI itself refuses unrecognized arguments.
OpenAI parameters this service does not implement are accepted only at their neutral value
(`frequency_penalty: 0`, `n: 1`, ...), so a client that always sends them still works, and one
that asks for their effect learns that it is not there. `user` is accepted and unused. vLLM's extra
fields (`min_tokens`, `ignore_eos`, `priority`, `guided_json`, `guided_regex`, `guided_choice`) are
accepted with vLLM's meaning, as its OpenAI client sends them in `extra_body`.
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

from domain import ChatMessage, CompletePrompt, GuidedDecoding, Prompt
from domain.generation import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_SEED,
)

from .schemas import (
    IGNORE_EOS_DESCRIPTION,
    MAX_LENGTH_LIMIT,
    MIN_TOKENS_DESCRIPTION,
    Priority,
    no_nul,
    top_logprobs_need_logprobs,
)

# OpenAI's "developer" role is the newer name of "system"; chat templates know only the latter.
TEMPLATE_ROLE = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The engine compiles a grammar from each schema or regex before generating: bound what it compiles.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_REGEX_CHARS = 4096
LOGPROBS_MEANING = (
    "log probabilities of the distribution each token was chosen from: the logits after the grammar's mask, "
    "divided by the temperature (as at 1 when temperature is 0), before top_p (vLLM's processed logprobs)"
)


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


def _schema_text(schema: Any) -> Any:
    """A JSON schema as compact JSON text. Its keys keep the caller's order: the grammar generates an
    object's properties in the order the schema lists them."""
    if not isinstance(schema, dict):
        raise ValueError(f"must be a JSON object (a JSON schema), got {type(schema).__name__}")
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"must be at most {MAX_SCHEMA_BYTES} bytes as JSON text, got {size}")
    return text


def _parsed_json_text(value: Any) -> Any:
    """vLLM's guided_json takes the schema or its JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"must be a JSON schema or its JSON text, got text that is not JSON ({error})") from None


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
SCHEMA_SIZE = f"at most {MAX_SCHEMA_BYTES} bytes as JSON text"
SchemaText = Annotated[str, BeforeValidator(_schema_text), WithJsonSchema({"type": "object"})]
GuidedJson = Annotated[
    str,
    BeforeValidator(_schema_text),
    BeforeValidator(_parsed_json_text),  # runs first
    WithJsonSchema({"anyOf": [{"type": "object"}, {"type": "string"}]}),
]
GuidedChoice = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = Field(False, strict=True, description="a last chunk, with no choices, carries the usage")


class JsonSchemaFormat(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$", description="names the schema; unused")
    schema_: SchemaText = Field(alias="schema", description=f"the JSON schema the answer follows; {SCHEMA_SIZE}")
    strict: bool | None = Field(None, strict=True, description="accepted; the schema is always enforced")
    description: str | None = Field(None, max_length=1024, description="accepted for compatibility; unused")


class ResponseFormat(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["json_schema"], "properties": {"json_schema": {"not": {"type": "null"}}}},
            "else": {"properties": {"json_schema": {"type": "null"}}},
        }
    )

    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: any text; json_object: a JSON object; json_schema: JSON that follows json_schema.schema"
    )
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_with_its_type(
        cls, json_schema: JsonSchemaFormat | None, info: ValidationInfo
    ) -> JsonSchemaFormat | None:
        kind = info.data.get("type")
        if kind == "json_schema" and json_schema is None:
            raise ValueError("required when type is 'json_schema'")
        if kind != "json_schema" and json_schema is not None:
            raise ValueError(f"only allowed when type is 'json_schema', got type {kind!r}")
        return json_schema

    def guided(self) -> GuidedDecoding | None:
        if self.type == "json_object":
            return GuidedDecoding("json_object", "", "response_format")
        if self.type == "json_schema":
            return GuidedDecoding("json_schema", self.json_schema.schema_, "response_format.json_schema.schema")
        return None


# The ways to ask for structured output, of which a request may use one.
GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


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
    response_format: ResponseFormat | None = Field(
        None, description="structured output: a JSON object, or JSON that follows a schema; default text"
    )
    # vLLM's extra parameters, as its OpenAI client sends them in extra_body.
    min_tokens: int | None = Field(None, strict=True, ge=0, le=MAX_LENGTH_LIMIT, description=MIN_TOKENS_DESCRIPTION)
    ignore_eos: bool = Field(False, strict=True, description=IGNORE_EOS_DESCRIPTION)
    priority: Priority = None
    guided_json: GuidedJson | None = Field(None, description=f"JSON that follows this JSON schema; {SCHEMA_SIZE}")
    guided_regex: str | None = Field(
        None, min_length=1, max_length=MAX_REGEX_CHARS, description="text that this regular expression matches whole"
    )
    guided_choice: Annotated[list[GuidedChoice], Field(min_length=1, max_length=MAX_LABELS)] | None = Field(
        None, description="exactly one of these strings"
    )

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @field_validator(*GUIDED_FIELDS[1:])
    @classmethod
    def _one_grammar(cls, value: Any, info: ValidationInfo) -> Any:
        earlier = GUIDED_FIELDS[: GUIDED_FIELDS.index(info.field_name)]
        given = [name for name in earlier if info.data.get(name) not in (None, ResponseFormat(type="text"))]
        if value is not None and given:
            raise ValueError(
                f"give at most one of response_format (json_object or json_schema), guided_json, guided_regex and "
                f"guided_choice; got {given[0]} too"
            )
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def guided(self) -> GuidedDecoding | None:
        if self.guided_json is not None:
            return GuidedDecoding("json_schema", self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return GuidedDecoding("regex", self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return GuidedDecoding("choice", json.dumps(self.guided_choice), "guided_choice")
        return self.response_format and self.response_format.guided()

    def command(self, prompt: Prompt, max_tokens: int | None, logprobs: int | None) -> CompletePrompt:
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
            logprobs=logprobs,
            priority=self.priority,
            guided=self.guided(),
        )


class ChatMessageIn(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent
    name: str | None = Field(None, max_length=256, description="accepted for compatibility; unused")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens = Field(None, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, strict=True, description=f"each answer token's logprob: {LOGPROBS_MEANING}")
    top_logprobs: int | None = Field(
        None, strict=True, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the likeliest tokens at each position"
    )

    _top_logprobs_need_logprobs = field_validator("top_logprobs")(top_logprobs_need_logprobs)

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
        return self.command(Prompt(messages), max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(GenerationRequest):
    prompt: PromptText = Field(description="raw text that the model continues (no chat template)")
    echo: Annotated[bool | None, Field(strict=True), Only(False, "the prompt is not repeated")] = None
    best_of: Annotated[int | None, Field(strict=True), Only(1, "one candidate per request")] = None
    suffix: Annotated[str | None, Only(None, "insertion is not implemented")] = None
    logprobs: int | None = Field(
        None,
        strict=True,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"each token's logprob and this many likeliest tokens at its position (up to "
        f"{MAX_TOP_LOGPROBS}, as vLLM and chat's top_logprobs allow; OpenAI's legacy bound is 5): {LOGPROBS_MEANING}",
    )

    def to_command(self) -> CompletePrompt:
        return self.command(Prompt.raw(self.prompt), self.max_tokens, self.logprobs)
