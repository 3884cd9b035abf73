"""Answers of the OpenAI-compatible API (/v1), in OpenAI's shapes: completions, their chunks' parts,
log probabilities, model cards and errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from domain import Generation, Model, TokenLogprob

from .errors import STATUS_BY_ERROR_TYPE

# OpenAI's stand-in for a token with no chance at all (a grammar masked it): -inf is not JSON.
NO_CHANCE_LOGPROB = -9999.0


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


def _chance(logprob: float) -> float:
    return max(logprob, NO_CHANCE_LOGPROB)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's UTF-8 bytes: a token may hold part of a character")

    @classmethod
    def of(cls, token: TokenLogprob) -> TopLogprob:
        return cls(token=token.token, logprob=_chance(token.logprob), bytes=list(token.bytes))


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the likeliest tokens at this position, likeliest first")

    @classmethod
    def of(cls, token: TokenLogprob) -> ChatTokenLogprob:
        return cls(**TopLogprob.of(token).model_dump(), top_logprobs=[TopLogprob.of(top) for top in token.top])


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob]) -> ChatLogprobs:
        return cls(content=[ChatTokenLogprob.of(token) for token in tokens])


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one list per property, a token's entries at the same index."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(
        description="per token: the likeliest tokens and the chosen one, by their text"
    )
    text_offset: list[int] = Field(description="where each token's text starts in the completion's text")

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], start: int, end: int) -> CompletionLogprobs:
        """`start` and `end` bound the text these tokens made; a token that holds part of a character
        has text of its own that the answer's text does not, so an offset never passes `end`."""
        offsets, offset = [], start
        for token in tokens:
            offsets.append(min(offset, end))
            offset += len(token.token)
        return cls(
            tokens=[token.token for token in tokens],
            token_logprobs=[_chance(token.logprob) for token in tokens],
            top_logprobs=[
                {**{top.token: _chance(top.logprob) for top in token.top}, token.token: _chance(token.logprob)}
                for token in tokens
            ],
            text_offset=offsets,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["local", "external", "fallback"] = Field(
        description="local: served by this service's engine; external: by a provider; fallback: a chain of models"
    )

    @classmethod
    def of(cls, model: Model, owner: str) -> ModelCard:
        return cls(id=model.id, created=int(model.created_at.timestamp()), owned_by=owner, kind=model.kind)


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
