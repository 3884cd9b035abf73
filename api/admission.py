"""Admission control in the HTTP process: past the cap, a generation request is refused with 429
at once, before its body is read or the engine is asked; while the worker drains for shutdown,
with 503. The engine's MAX_QUEUE_SIZE check stays the global bound; this one keeps a burst from
piling up in front of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response


@dataclass
class AdmissionGate:
    """One per HTTP worker, shared by its middleware (which counts) and its shutdown drain (which waits)."""

    limit: int
    in_flight: int = 0
    draining: bool = False


class AdmissionMiddleware:
    """`respond` renders a refusal: the service's error shape, or OpenAI's on the /v1 routes."""

    def __init__(
        self,
        app: ASGIApp,
        paths: set[str],
        gate: AdmissionGate,
        respond: Callable[[str, str], Response] = error_response,
    ) -> None:
        self.app = app
        self.paths = paths
        self.gate = gate
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        gate = self.gate
        if gate.draining:
            message = "the service is shutting down and takes no new generation requests; retry on another instance"
            await self.respond(message, "shutting_down")(scope, receive, send)
            return
        if gate.in_flight >= gate.limit:
            message = (
                f"the service is at its limit of {gate.limit} generation requests in this worker "
                f"(MAX_CONCURRENT_REQUESTS across the workers); retry shortly"
            )
            await self.respond(message, "overloaded")(scope, receive, send)
            return
        gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gate.in_flight -= 1
