"""What goes to an OpenAI-compatible provider and what comes back, in the domain's terms: a prompt and
its parameters as a request's arguments, streamed chunks as TextDeltas and a Generation, and a
decision among labels read off the first answer token's likeliest alternatives."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from domain import (
    ChatMessage,
    ExternalModelError,
    Generation,
    GenerationParams,
    Prompt,
    ProviderError,
    TextDelta,
    TokenLogprob,
)
from domain.generation import MAX_TOP_LOGPROBS

CHAT, COMPLETIONS = "chat", "completions"
# What our answers say; a provider's other finish reasons (content_filter, ...) read as stop.
FINISH_REASONS = ("stop", "length")


def generation_request(model: str, prompt: Prompt, params: GenerationParams) -> tuple[str, dict[str, Any]]:
    """The API (chat messages, or a raw prompt's completion) and its arguments, streamed with usage.
    Parameters left at their neutral values are not sent, so a provider that lacks them still answers;
    vLLM's (min_tokens, ignore_eos, guided_*) go in the body as vLLM's own client sends them."""
    arguments: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    extra: dict[str, Any] = {}
    if params.top_p != 1.0:
        arguments["top_p"] = params.top_p
    if params.stop:
        arguments["stop"] = list(params.stop)
    if params.seed is not None:
        arguments["seed"] = params.seed
    if params.min_new_tokens:
        extra["min_tokens"] = params.min_new_tokens
    if params.ignore_eos:
        extra["ignore_eos"] = True
    if params.guided is not None:
        extra.update(_guided(params.guided.kind, params.guided.value))
    if extra:
        arguments["extra_body"] = extra
    if prompt.text is not None:
        if params.logprobs is not None:
            arguments["logprobs"] = params.logprobs
        return COMPLETIONS, {**arguments, "prompt": prompt.text}
    if params.logprobs is not None:
        arguments.update(logprobs=True, top_logprobs=params.logprobs)
    return CHAT, {**arguments, "messages": prompt.to_list()}


def _guided(kind: str, value: str) -> dict[str, Any]:
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {"name": "answer", "schema": json.loads(value)}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    if kind == "regex":
        return {"guided_regex": value}
    return {"guided_choice": json.loads(value)}


def _token(token: str, logprob: float, token_bytes: list[int] | None = None) -> TokenLogprob:
    return TokenLogprob(token, tuple(token.encode() if token_bytes is None else token_bytes), logprob)


def chat_logprobs(content: list[Any] | None) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            item.token,
            tuple(item.bytes or item.token.encode()),
            item.logprob,
            tuple(_token(top.token, top.logprob, top.bytes) for top in item.top_logprobs or ()),
        )
        for item in content or ()
    )


def completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """OpenAI's legacy shape: a list per property; a token's alternatives by their text."""
    if logprobs is None or not logprobs.tokens:
        return ()
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    return tuple(
        TokenLogprob(
            token,
            tuple(token.encode()),
            logprob,
            tuple(_token(text, value) for text, value in sorted((top or {}).items(), key=lambda item: -item[1])),
        )
        for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops)
    )


@dataclass
class StreamedAnswer:
    """A provider's streamed answer as it comes: its pieces of text, then the whole Generation."""

    model_id: str
    params: GenerationParams
    started: float = field(default_factory=time.perf_counter)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_text_at: float | None = None

    def read(self, api: str, chunk: Any) -> TextDelta | None:
        """The chunk's piece of text, if it has one; its finish reason and usage are kept."""
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            self.cached_prompt_tokens = (details.cached_tokens or 0) if details is not None else 0
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason if choice.finish_reason in FINISH_REASONS else "stop"
        if api == CHAT:
            text = choice.delta.content or ""
            tokens = chat_logprobs(choice.logprobs.content) if choice.logprobs is not None else ()
        else:
            text = choice.text or ""
            tokens = completion_logprobs(choice.logprobs)
        if not text and not tokens:
            return None
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.text.append(text)
        self.logprobs.extend(tokens)
        return TextDelta(text, tokens)

    def generation(self) -> Generation:
        now = time.perf_counter()
        return Generation(
            text="".join(self.text),
            model_id=self.model_id,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            generation_time_s=round(now - self.started, 4),
            max_new_tokens=self.params.max_new_tokens,
            temperature=self.params.temperature,
            time_to_first_token_s=round((self.first_text_at or now) - self.started, 4),
            cached_prompt_tokens=self.cached_prompt_tokens,
            logprobs=tuple(self.logprobs) if self.params.logprobs is not None else None,
        )


# Deciding among labels through a provider: the provider cannot score a label's whole token sequence
# as the engine does, so one answer token is asked for with its likeliest alternatives, and each
# label gets the probability of the alternatives that begin it (and no other label).


def _first_word(label: str) -> str:
    return label.strip().split(maxsplit=1)[0].casefold() if label.strip() else ""


def check_labels_begin_apart(model_id: str, labels: tuple[str, ...], field_name: str) -> None:
    """Each label's first word must be no start of another's, or one first token would begin both."""
    for label in labels:
        for other in labels:
            if label != other and _first_word(other).startswith(_first_word(label)):
                raise ExternalModelError(
                    f"{field_name}: {model_id!r} is an external model, whose labels are scored by their first "
                    f"token, so no label's first word may begin another's; {label!r} and {other!r} begin alike"
                )


def decision_request(model: str, prompt: Prompt, labels: tuple[str, ...]) -> dict[str, Any]:
    """One greedy answer token and its likeliest alternatives, the labels listed after the question."""
    options = "\n\nAnswer with exactly one of: " + ", ".join(labels) + "."
    *before, last = prompt.messages
    messages = [*before, ChatMessage(last.role, last.content + options)]
    return {
        "model": model,
        "messages": Prompt(tuple(messages)).to_list(),
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": MAX_TOP_LOGPROBS,
    }


def label_probabilities(who: str, model_id: str, labels: tuple[str, ...], completion: Any) -> dict[str, float]:
    """Each label's probability, normalized over the labels, from the answer token's alternatives."""
    choice = completion.choices[0] if completion.choices else None
    content = choice.logprobs.content if choice is not None and choice.logprobs is not None else None
    if not content:
        raise ExternalModelError(
            f"{model_id!r} is an external model whose provider ({who}) gave no log probabilities, which a "
            f"decision among labels needs"
        )
    alternatives = content[0].top_logprobs or [content[0]]
    mass = dict.fromkeys(labels, 0.0)
    for alternative in alternatives:
        start = alternative.token.strip().casefold()
        begun = [label for label in labels if start and label.casefold().startswith(start)]
        if len(begun) == 1:
            mass[begun[0]] += math.exp(alternative.logprob)
    total = sum(mass.values())
    if total == 0:
        seen = ", ".join(repr(alternative.token) for alternative in alternatives[:5])
        raise ProviderError(
            f"{who} answered {model_id!r}'s decision with no label among its likeliest first tokens ({seen}, ...)"
        )
    return {label: value / total for label, value in mass.items()}
