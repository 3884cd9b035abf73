"""ApiKeyMiddleware: with keys, 401 before anything else runs, unless the request carries one of them."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import SecretStr

from api.auth import OPEN_WARNING, ApiKeyMiddleware, exempt_paths, warn_when_open

KEYS = (SecretStr("first-key"), SecretStr("second-key"))
WRONG = "not-a-key-of-ours"


class Recorder:
    """The app behind the middleware: answers 200 and counts the requests that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def guarded(metrics_require_api_key: bool = True) -> tuple[ApiKeyMiddleware, Recorder]:
    app = Recorder()
    return ApiKeyMiddleware(app, keys=KEYS, exempt=exempt_paths(metrics_require_api_key), openai_prefix="/v1"), app


def scope(path: str, authorization: str | None = None, method: str = "POST", kind: str = "http") -> dict:
    headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    return {"type": kind, "method": method, "path": path, "headers": headers, "query_string": b""}


def call(app, request_scope: dict) -> tuple[int, dict, dict, bool]:
    """The status, headers and body sent, and whether the body was read."""
    sent: list[dict] = []
    read = False

    async def receive() -> dict:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b'{"query": "hi"}', "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(request_scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    headers = {key.decode(): value.decode() for key, value in start["headers"]}
    return start["status"], headers, json.loads(body), read


@pytest.mark.parametrize(
    "authorization, message, challenge",
    [
        (None, "this service needs an API key: send it as `Authorization: Bearer <key>`", "Bearer"),
        (f"Bearer {WRONG}", "the API key sent is not one of this service's keys", 'Bearer error="invalid_token"'),
        ("Basic Zmlyc3Qta2V5Og==", "the Authorization header is not `Bearer <key>`", "Bearer"),
        ("Bearer ", "the Authorization header is not `Bearer <key>`", "Bearer"),
        ("first-key", "the Authorization header is not `Bearer <key>`", "Bearer"),
    ],
)
def test_a_request_without_a_right_key_gets_401_before_its_body_is_read(authorization, message, challenge):
    middleware, app = guarded()

    status, headers, body, read = call(middleware, scope("/generate", authorization))

    assert status == 401 and headers["www-authenticate"] == challenge
    assert body["error_type"] == "unauthorized" and body["error"].startswith(message)
    assert app.calls == 0 and not read


@pytest.mark.parametrize("authorization", ["Bearer first-key", "Bearer second-key", "bearer second-key", "Bearer  first-key "])
def test_any_configured_key_passes(authorization):
    middleware, app = guarded()

    status, _, _, _ = call(middleware, scope("/generate", authorization))

    assert status == 200 and app.calls == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/no-such-route", "/v1"])
def test_under_v1_the_401_is_in_openais_error_shape(path):
    middleware, _ = guarded()

    status, _, body, _ = call(middleware, scope(path, f"Bearer {WRONG}"))

    assert status == 401
    assert body == {
        "error": {
            "message": "the API key sent is not one of this service's keys",
            "type": "invalid_request_error",
            "param": None,
            "code": "unauthorized",
        }
    }


@pytest.mark.parametrize("path", ["/health", "/docs.json", "/", "/generate-task/status", "/v1x", "/livez/", "/static_content/index.css"])
def test_every_other_route_is_guarded_in_our_shape(path):
    middleware, app = guarded()

    status, _, body, _ = call(middleware, scope(path, method="GET"))

    assert status == 401 and body["error_type"] == "unauthorized" and app.calls == 0


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz"])
def test_the_probes_need_no_key(path):
    middleware, app = guarded()

    status, _, _, _ = call(middleware, scope(path, method="GET"))

    assert status == 200 and app.calls == 1


@pytest.mark.parametrize("metrics_require_api_key, status", [(True, 401), (False, 200)])
def test_metrics_needs_a_key_as_the_setting_says(metrics_require_api_key, status):
    middleware, _ = guarded(metrics_require_api_key)

    assert call(middleware, scope("/metrics", method="GET"))[0] == status
    assert call(middleware, scope("/metrics", "Bearer first-key", method="GET"))[0] == 200


def test_a_websocket_without_a_key_is_closed_before_the_handshake():
    middleware, app = guarded()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(middleware(scope("/ws", kind="websocket"), receive, send))

    assert sent == [{"type": "websocket.close", "code": 1008}] and app.calls == 0


def test_the_key_sent_is_never_logged_nor_answered(caplog):
    middleware, _ = guarded()

    with caplog.at_level(logging.DEBUG):
        _, headers, body, _ = call(middleware, scope("/generate", f"Bearer {WRONG}"))
        call(middleware, scope("/generate", "Bearer first-key"))

    shown = caplog.text + json.dumps(body) + json.dumps(headers)
    assert WRONG not in shown and "first-key" not in shown


def test_keys_are_required():
    with pytest.raises(ValueError, match="at least one key"):
        ApiKeyMiddleware(Recorder(), keys=(), exempt=(), openai_prefix="/v1")


def test_an_open_service_warns_and_a_guarded_one_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        warn_when_open(())
        warn_when_open(KEYS)

    assert [record.getMessage() for record in caplog.records] == [OPEN_WARNING]
