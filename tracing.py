"""OpenTelemetry: one span per request, none per message of its body.

BentoML wraps every service in OpenTelemetry's ASGI middleware without `exclude_spans`, so each
`send` and `receive` of a request opens a span of its own. A streamed generation sends one message
per token, through the API worker and again through the engine: those spans were about a quarter
of the engine's event-loop samples under a c=32 streaming load. The request's own span, its status
and the propagated trace context stay.
"""

from __future__ import annotations

from opentelemetry.instrumentation import asgi

MESSAGE_SPANS = ["receive", "send"]


class RequestSpanMiddleware(asgi.OpenTelemetryMiddleware):
    def __init__(self, app, *args, **kwargs) -> None:
        kwargs.setdefault("exclude_spans", MESSAGE_SPANS)
        super().__init__(app, *args, **kwargs)


def trace_requests_not_messages() -> None:
    """Makes BentoML build RequestSpanMiddleware: it imports the middleware by name when it builds an app."""
    asgi.OpenTelemetryMiddleware = RequestSpanMiddleware
