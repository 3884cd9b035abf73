"""Validates request bodies before BentoML sees them, so every bad request answers 422 in our error shape.

BentoML's own validation answers 400 with `{"error", "detail"}` and no input values; this middleware
answers with the field, the limit and the value given. It also merges query parameters into the body
(`POST /load-model?model_id=x`), and re-sends the validated body, so BentoML's parsing cannot fail.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

PREVIEW_CHARS = 80


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else f"{text[:PREVIEW_CHARS]}... ({len(text)} characters)"


def describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown field")
        elif item["type"] == "value_error":
            problems.append(f"{field}: {item['ctx']['error']}")
        elif item["type"] == "missing":
            problems.append(f"{field}: required field is missing")
        else:
            problems.append(f"{field}: {item['msg']}, got {_preview(item.get('input'))}")
    return "; ".join(problems)


class InvalidBody(Exception):
    def __init__(self, message: str, error_type: str = "validation_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class RequestValidationMiddleware:
    def __init__(self, app: ASGIApp, schemas: dict[str, type[BaseModel]], max_body_bytes: int) -> None:
        self.app = app
        self.schemas = schemas
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        schema = self.schemas.get(scope.get("path", "")) if scope["type"] == "http" else None
        if schema is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
            validated = schema.model_validate(self._merge_query(scope, self._parse(body)))
        except InvalidBody as error:
            await error_response(error.message, error.error_type)(scope, receive, send)
            return
        except ValidationError as error:
            await error_response(describe(error), "validation_error")(scope, receive, send)
            return
        body = validated.model_dump_json().encode()
        await self.app(self._with_json_body(scope, body), self._replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidBody("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise InvalidBody(f"body: must be at most {self.max_body_bytes} bytes, got more", "payload_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
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

    @staticmethod
    def _merge_query(scope: Scope, data: dict[str, Any]) -> dict[str, Any]:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return {**query, **data}

    @staticmethod
    def _with_json_body(scope: Scope, body: bytes) -> Scope:
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        return {**scope, "headers": headers, "query_string": b""}

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """Gives the validated body once, then the real connection's messages (so disconnects still show)."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
