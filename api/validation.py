"""Validates request bodies before BentoML sees them, so every bad request answers 422 in our error shape.

BentoML's own validation answers 400 with `{"error", "detail"}` and no input values; this middleware
answers with the field, the limit and the value given. It also merges query parameters into the body
(`POST /load-model?model_id=x`), and re-sends the validated body, so BentoML's parsing cannot fail.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domain import ModelServiceError
from engine.core.queue_board import door_ticket

from .errors import error_response, response_for

PREVIEW_CHARS = 80


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else f"{text[:PREVIEW_CHARS]}... ({len(text)} characters)"


def describe(error: ValidationError) -> str:
    return describe_problems(error.errors(include_url=False))


def describe_problems(problems: Iterable[dict[str, Any]]) -> str:
    """Pydantic's error items as one message: each field, what is wrong with it, and the value given."""
    described = []
    for item in problems:
        field = field_name(item["loc"])
        if item["type"] == "extra_forbidden":
            described.append(f"{field}: unknown field")
        elif item["type"] == "value_error":
            described.append(f"{field}: {item['ctx']['error']}")
        elif item["type"] == "missing":
            described.append(f"{field}: required field is missing")
        else:
            described.append(f"{field}: {item['msg']}, got {_preview(item.get('input'))}")
    return "; ".join(described)


def field_name(location: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in location) or "body"


class InvalidBody(Exception):
    def __init__(self, message: str, error_type: str = "validation_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


async def read_body(receive: Receive, max_body_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidBody("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body_bytes:
            raise InvalidBody(f"body: must be at most {max_body_bytes} bytes, got more", "payload_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever its content type; an empty body is `{}`."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InvalidBody(f"body: must be UTF-8, got an invalid byte at position {error.start}") from None
    except json.JSONDecodeError as error:
        raise InvalidBody(f"body: must be JSON, got a syntax error at line {error.lineno} column {error.colno}: {error.msg}") from None
    except (RecursionError, ValueError) as error:  # nesting too deep, an integer past Python's digit limit
        raise InvalidBody(f"body: JSON too deeply nested or with a number too long to read ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidBody(f"body: must be a JSON object, got {type(data).__name__}")
    return data


def with_json_body(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {**scope, "headers": headers, "query_string": b""}


def replay(body: bytes, receive: Receive) -> Receive:
    """Gives the validated body once, then the real connection's messages (so disconnects still show)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class Door(abc.ABC):
    """Load shedding at the door: whether a validated request is let in, decided before its handler,
    its cache lookup, its hop to the engine and the engine's tokenizer."""

    @abc.abstractmethod
    def admit(self, path: str, fields: dict[str, Any]) -> int:
        """A ticket for the request's work (NO_TICKET: not counted here); raises ModelServiceError to refuse it."""

    @abc.abstractmethod
    def release(self, ticket: int) -> None:
        """The request ended."""


class RequestValidationMiddleware:
    """With a `door`, the validated requests of `door_paths` go through it."""

    def __init__(
        self,
        app: ASGIApp,
        schemas: dict[str, type[BaseModel]],
        max_body_bytes: int,
        door: Door | None = None,
        door_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.schemas = schemas
        self.max_body_bytes = max_body_bytes
        self.door = door
        self.door_paths = door_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        schema = self.schemas.get(scope.get("path", "")) if scope["type"] == "http" else None
        if schema is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.max_body_bytes)
            validated = schema.model_validate(self._merge_query(scope, parse_json_object(body)))
        except InvalidBody as error:
            await error_response(error.message, error.error_type)(scope, receive, send)
            return
        except ValidationError as error:
            await error_response(describe(error), "validation_error")(scope, receive, send)
            return
        if self.door is None or scope["path"] not in self.door_paths:
            body = validated.model_dump_json().encode()
            await self.app(with_json_body(scope, body), replay(body, receive), send)
            return
        try:
            ticket = self.door.admit(scope["path"], dict(validated))
        except ModelServiceError as refused:
            await response_for(refused)(scope, receive, send)
            return
        reserved = door_ticket.set(ticket)
        try:
            # The requests of a burst arrive together: each is let in or refused before any of them
            # runs its handler, so a refusal waits for no one's work.
            await asyncio.sleep(0)
            body = validated.model_dump_json().encode()
            await self.app(with_json_body(scope, body), replay(body, receive), send)
        finally:
            door_ticket.reset(reserved)
            self.door.release(ticket)

    @staticmethod
    def _merge_query(scope: Scope, data: dict[str, Any]) -> dict[str, Any]:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return {**query, **data}
