"""API keys: with keys configured, every request needs `Authorization: Bearer <key>` (what the OpenAI client
sends), but the probes' and, where METRICS_REQUIRE_API_KEY is false, /metrics. The check wraps the service's
other middlewares, so a refused request has its body left unread and takes no admission slot. The key given
is compared with every configured one, always all of them, in constant time over their SHA-256 digests (so
not even a key's length shows in the timing); it is never logged or repeated in an answer."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response, openai_error_response

logger = logging.getLogger(__name__)

# Kubernetes' and load balancers' probes send no key; /healthz is BentoML's alias of /livez.
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
METRICS_PATH = "/metrics"
ERROR_TYPE = "unauthorized"
# RFC 6750: the scheme the client must use, and what was wrong with the token it sent.
CHALLENGE = "Bearer"
INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token"'
WEBSOCKET_POLICY_VIOLATION = 1008
MISSING_KEY = "this service needs an API key: send it as `Authorization: Bearer <key>`"
NOT_BEARER = "the Authorization header is not `Bearer <key>`: this service takes its API keys as bearer tokens"
WRONG_KEY = "the API key sent is not one of this service's keys"
OPEN_WARNING = "neither API_KEYS nor API_KEYS_FILE is set: every route is open to whoever reaches this port"


def exempt_paths(metrics_require_api_key: bool) -> frozenset[str]:
    """The routes that need no key."""
    return PROBE_PATHS if metrics_require_api_key else PROBE_PATHS | {METRICS_PATH}


def warn_when_open(keys: tuple[SecretStr, ...]) -> None:
    if not keys:
        logger.warning(OPEN_WARNING)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeyMiddleware:
    """Answers 401 `unauthorized`, in OpenAI's error shape under `openai_prefix` and ours elsewhere, to a
    request without one of `keys`, unless its path is one of `exempt`."""

    def __init__(self, app: ASGIApp, keys: Iterable[SecretStr], exempt: Iterable[str], openai_prefix: str) -> None:
        self.app = app
        self._digests = tuple(_digest(key.get_secret_value().encode()) for key in keys)
        if not self._digests:
            raise ValueError("ApiKeyMiddleware needs at least one key; without keys the service is open")
        self.exempt = frozenset(exempt)
        self.openai_prefix = openai_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":  # closed before the handshake is accepted: the client sees a 403
            await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION})
        else:
            message, challenge = refusal
            path = scope["path"]
            under_openai = path == self.openai_prefix or path.startswith(self.openai_prefix + "/")
            response = (openai_error_response if under_openai else error_response)(message, ERROR_TYPE)
            response.headers["WWW-Authenticate"] = challenge
            await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[str, str] | None:
        """Why the request is refused, and the challenge that says so; None for a request with a right key."""
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        if header is None:
            return MISSING_KEY, CHALLENGE
        scheme, _, key = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not key.strip():
            return NOT_BEARER, CHALLENGE
        return None if self._accepts(key.strip()) else (WRONG_KEY, INVALID_TOKEN_CHALLENGE)

    def _accepts(self, key: bytes) -> bool:
        given = _digest(key)
        accepted = False
        for digest in self._digests:  # every one, even after a match: the time says nothing of which key
            accepted |= hmac.compare_digest(given, digest)
        return accepted
