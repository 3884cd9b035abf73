"""Admission control in the HTTP process: past the cap, a generation request is refused with 429
at once, before its body is read or the engine is asked. The engine's MAX_QUEUE_SIZE check stays
the global bound; this one keeps a burst from piling up in front of it."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, paths: set[str], limit: int) -> None:
        self.app = app
        self.paths = paths
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            message = (
                f"the service is at its limit of {self.limit} generation requests in this worker "
                f"(MAX_CONCURRENT_REQUESTS across the workers); retry shortly"
            )
            await error_response(message, "overloaded")(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
