"""From a /generate or /classify body to commands, and the batch form: items that share every field of
the request but their own passages (and, if they give one, their own query), answered in order, each
with its result or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from domain import Classify, GenerateText

from .errors import count_error, error_body
from .schemas import ItemError
from .validation import describe_problems

T = TypeVar("T")
Command = GenerateText | Classify


def generation_command(fields: dict[str, Any]) -> Command:
    """/generate's command (and /generate/stream's, which takes neither items nor choices): a decision
    when it names choices, else a generation."""
    fields = {name: value for name, value in fields.items() if name != "items"}
    choices, logprobs, top_logprobs = fields.pop("choices", None), fields.pop("logprobs"), fields.pop("top_logprobs")
    if choices is not None:
        return Classify(
            query=fields["query"],
            labels=tuple(choices),
            context=fields["context"],
            model_id=fields["model_id"],
            timeout=fields["timeout"],
            priority=fields["priority"],
            labels_field="choices",
        )
    return GenerateText(**fields, logprobs=(top_logprobs or 0) if logprobs else None)


def classify_command(fields: dict[str, Any]) -> Classify:
    names = ("query", "context", "model_id", "timeout", "priority")
    return Classify(labels=tuple(fields["labels"]), **{name: fields[name] for name in names})


async def answer_items(
    fields: dict[str, Any],
    item_schema: type[BaseModel],
    command_for: Callable[[dict[str, Any]], Command],
    run: Callable[[Command], Awaitable[T]],
) -> list[T | ItemError]:
    """Every item's answer, in order. All items go to the engine at once, so they share its batches and
    the prompt prefix their common query makes."""

    async def answer(index: int, item: Any) -> T | ItemError:
        try:
            parsed = item_schema.model_validate(item)
        except ValidationError as error:
            problems = [
                {**problem, "loc": ("items", index, *problem["loc"])} for problem in error.errors(include_url=False)
            ]
            count_error("validation_error")
            return ItemError(error=describe_problems(problems), error_type="validation_error")
        try:
            return await run(
                command_for({**fields, "query": parsed.query or fields["query"], "context": parsed.context})
            )
        except Exception as error:  # noqa: BLE001: one item's failure is its own answer; the others go on
            body = error_body(error)
            count_error(body["error_type"])
            return ItemError(error=f"items.{index}: {body['error']}", error_type=body["error_type"])

    return list(await asyncio.gather(*(answer(index, item) for index, item in enumerate(fields["items"]))))
