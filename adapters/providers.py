"""External models, each served by a provider's OpenAI-compatible API through the `openai` package's
async client (its connection pool; its own retries off, ours below).

A provider's failures, in the service's errors (README, "External models and fallback chains"): its
429 is our 429 with its Retry-After; its 5xx, a connection refused or broken, or a key it refuses is
a 502 (provider_error) naming it; no answer within its timeout_s, or within the request's own time,
is a 504. A call the provider never answered (no connection made, or its 502 or 503) is tried again
after a short pause, at most max_retries times and only while the request's time allows; a call it
answered otherwise, or whose stream has begun, never is. Past max_concurrency calls in flight, a call
waits up to queue_timeout_s for a place, then is a 429. The circuit breaker counts connection
failures, timeouts and 5xx; once open, calls are refused with a 503 (provider_unavailable) whose
Retry-After is the rest of the cool-down.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2  # the transport under the openai package: its errors are how a stream breaks off
import openai

from domain import (
    ClassifyParams,
    Decision,
    ExternalModelError,
    Generation,
    GenerationParams,
    GenerationTimeoutError,
    InvalidRequestError,
    Model,
    ModelRepository,
    ModelServiceError,
    OverloadedError,
    Prompt,
    ProviderError,
    ProviderUnavailableError,
)
from domain.errors import deadline_name
from domain.generation import REQUEST_TIMEOUT
from domain.model import EXTERNAL
from metrics import ProviderMetrics

from .circuit_breaker import CircuitBreaker, CircuitState
from .provider_wire import (
    CHAT,
    StreamedAnswer,
    check_labels_begin_apart,
    decision_request,
    generation_request,
    label_probabilities,
)
from .providers_file import ProviderEntry

RETRY_PAUSE_S = 0.2  # before the first retry; doubled for each next one, with jitter
BUSY_RETRY_AFTER_S = 1.0
# The provider's statuses that say it did none of the work: a gateway with no upstream, or unavailable.
NOT_DONE_STATUSES = (502, 503)
# The provider's statuses that refuse the request itself: the caller's to fix, so passed on as ours.
REQUEST_REFUSED_STATUSES = (400, 413, 422)
# What a call's end says of the provider's health, for its circuit breaker.
HEALTHY, FAILING, UNKNOWN = "healthy", "failing", "unknown"


class UnansweredCall(ProviderError):
    """The provider did none of the work (no connection, or its 502 or 503): safe to try again."""


class DeadlinePassed(Exception):
    """The request's own time ran out while the provider was answering."""


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The provider's Retry-After (seconds or an HTTP date), or OpenAI's retry-after-ms."""
    try:
        if (milliseconds := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(milliseconds) / 1000)
        if (value := headers.get("retry-after")) is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _said(error: openai.APIStatusError) -> str:
    """The provider's own message: OpenAI's error body, or a plain text or `{"error": text}` one."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    if isinstance(body, str):
        return body
    return error.response.text[:500] or error.message


class OpenAICompatibleProvider(ModelRepository):
    """One external model. `client` (a real `openai.AsyncOpenAI`, over a scripted transport in unit
    tests), `clock` and `sleep` may be given."""

    def __init__(
        self,
        entry: ProviderEntry,
        api_key: str,
        client: openai.AsyncOpenAI | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.entry = entry
        self.who = f"the provider of {entry.model_id!r} at {entry.base_url}"
        self._client = client or openai.AsyncOpenAI(
            base_url=entry.base_url,
            api_key=api_key,
            timeout=openai.Timeout(entry.timeout_s, connect=entry.connect_timeout_s),
            max_retries=0,
        )
        breaker = entry.circuit_breaker
        self.breaker = CircuitBreaker(breaker.failure_threshold, breaker.cooldown_s, clock)
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(entry.max_concurrency)
        self._in_flight = 0
        self._metrics = ProviderMetrics(entry.model_id)
        self._created_at = datetime.now(timezone.utc)

    async def close(self) -> None:
        await self._client.close()

    # The port.

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        raise self._not_loadable("loaded")

    async def unload_model(self, model_id: str) -> Model:
        raise self._not_loadable("unloaded")

    def _not_loadable(self, done: str) -> ExternalModelError:
        return ExternalModelError(
            f"model_id {self.entry.model_id!r} is an external model, served by {self.entry.base_url} as "
            f"{self.entry.model!r}: it is never {done} here"
        )

    async def get_model(self, model_id: str) -> Model:
        return self.describe()

    async def list_models(self) -> list[Model]:
        return [self.describe()]

    def describe(self) -> Model:
        state = self.breaker.state
        self._metrics.circuit(state.level)
        return Model(
            id=self.entry.model_id,
            name=self.entry.model,
            type=EXTERNAL,
            device="remote",
            is_loaded=False,  # nothing of it is in this service's memory; it serves unless its circuit is open
            path=self.entry.base_url,
            created_at=self._created_at,
            updated_at=self._created_at,
            metadata={
                "base_url": self.entry.base_url,
                "provider_model": self.entry.model,
                "circuit": state.value,
                "retry_in_s": round(self.breaker.retry_in_s(), 2),
                "in_flight": self._in_flight,
                "max_concurrency": self.entry.max_concurrency,
            },
            kind=EXTERNAL,
        )

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        deadline = self._clock() + params.timeout_s
        api, arguments = generation_request(self.entry.model, prompt, params)
        create = self._client.chat.completions.create if api == CHAT else self._client.completions.create
        answer = StreamedAnswer(self.entry.model_id, params)
        chunks = self._called(
            deadline, params, lambda: create(**arguments), lambda stream: self._chunks(stream, deadline)
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                if (piece := answer.read(api, chunk)) is not None:
                    yield piece
        self._metrics.tokens(answer.prompt_tokens, answer.completion_tokens)
        yield answer.generation()

    async def classify(self, model_id: str, prompt: Prompt, params: ClassifyParams) -> Decision:
        check_labels_begin_apart(model_id, params.labels, params.field)
        deadline = self._clock() + params.timeout_s
        arguments = decision_request(self.entry.model, prompt, params.labels)
        started = time.perf_counter()
        [completion] = [
            whole
            async for whole in self._called(
                deadline, params, lambda: self._client.chat.completions.create(**arguments), self._whole
            )
        ]
        usage = completion.usage
        details = usage.prompt_tokens_details if usage is not None else None
        if usage is not None:
            self._metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
        probabilities = label_probabilities(self.who, model_id, params.labels, completion)
        return Decision(
            label=max(params.labels, key=probabilities.__getitem__),
            probabilities=probabilities,
            model_id=self.entry.model_id,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            cached_prompt_tokens=(details.cached_tokens or 0) if details is not None else 0,
            decision_time_s=round(time.perf_counter() - started, 4),
        )

    # Calls: the concurrency cap, retries, the breaker, failures and their counts.

    async def _called(
        self,
        deadline: float,
        params: GenerationParams | ClassifyParams,
        call: Callable[[], Awaitable[Any]],
        pieces: Callable[[Any], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        """What `pieces` reads off the answer to `call`, made within the cap and the breaker, and
        made again while it went unanswered, nothing was read and the deadline allows."""
        try:
            async with self._slot(deadline):
                for attempt in itertools.count():
                    read = False
                    try:
                        with self._attempt(deadline, params):
                            answered = await self._within(deadline, call())
                            async with aclosing(pieces(answered)) as each:
                                async for piece in each:
                                    read = True
                                    yield piece
                        return
                    except UnansweredCall:
                        pause_s = RETRY_PAUSE_S * 2**attempt * random.uniform(0.5, 1.0)
                        out_of_time = self._clock() + pause_s >= deadline
                        opened = self.breaker.state is not CircuitState.CLOSED
                        if read or attempt >= self.entry.max_retries or out_of_time or opened:
                            raise
                        await self._sleep(pause_s)
        except ModelServiceError as error:
            self._metrics.error(error.error_type)
            raise

    @staticmethod
    async def _whole(completion: Any) -> AsyncIterator[Any]:
        yield completion

    async def _chunks(self, stream: Any, deadline: float) -> AsyncIterator[Any]:
        try:
            while (chunk := await self._within(deadline, anext(stream, None))) is not None:
                yield chunk
        finally:
            await stream.close()

    async def _within(self, deadline: float, operation: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return await operation
        except TimeoutError:
            raise DeadlinePassed from None

    @asynccontextmanager
    async def _slot(self, deadline: float) -> AsyncIterator[None]:
        wait_s = max(0.0, min(self.entry.queue_timeout_s, deadline - self._clock()))
        try:
            async with asyncio.timeout(wait_s if self._slots.locked() else None):
                await self._slots.acquire()
        except TimeoutError:
            raise OverloadedError(
                f"{self.who} has all of its max_concurrency ({self.entry.max_concurrency}) calls in flight, and "
                f"none ended within {wait_s:.1f}s; retry later",
                retry_after_s=BUSY_RETRY_AFTER_S,
            ) from None
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._slots.release()

    @contextmanager
    def _attempt(self, deadline: float, params: GenerationParams | ClassifyParams) -> Iterator[None]:
        """One call to the provider: let through by the breaker, its end told to the breaker and counted,
        its failure raised as the service's error."""
        if not self.breaker.allow():
            self._metrics.circuit(self.breaker.state.level)
            raise ProviderUnavailableError(
                f"{self.who} failed {self.breaker.failure_threshold} times in a row: its circuit is open, and it "
                f"is not called for {self.breaker.retry_in_s():.1f}s more",
                retry_after_s=self.breaker.retry_in_s(),
            )
        started = self._clock()
        try:
            yield
        except BaseException as raised:  # noqa: BLE001: a cancelled call still frees the breaker's probe
            error, outcome, health = self._failure(raised, params)
            self._ended(health, outcome, started)
            if error is None:
                raise
            raise error from raised
        self._ended(HEALTHY, "ok", started)

    def _ended(self, health: str, outcome: str | None, started: float) -> None:
        {HEALTHY: self.breaker.record_success, FAILING: self.breaker.record_failure}.get(
            health, self.breaker.record_neither
        )()
        self._metrics.circuit(self.breaker.state.level)
        if outcome is not None:
            self._metrics.call(outcome, self._clock() - started)

    def _failure(
        self, raised: BaseException, params: GenerationParams | ClassifyParams
    ) -> tuple[ModelServiceError | None, str | None, str]:
        """The service's error for a failed call, its outcome on the metrics, and what it says of the
        provider's health; no error for what is not the provider's failure (a cancelled call, a bug)."""
        who = self.who
        if isinstance(raised, DeadlinePassed):
            limit = deadline_name(params.timeout_by == REQUEST_TIMEOUT)
            message = f"{who} had not answered when the request's time ran out ({limit}: {params.timeout_s:.1f}s left)"
            return GenerationTimeoutError(message), "timeout", UNKNOWN
        if isinstance(raised, (openai.APITimeoutError, httpx2.TimeoutException)):
            limits = f"timeout_s {self.entry.timeout_s:g}s, connect_timeout_s {self.entry.connect_timeout_s:g}s"
            return GenerationTimeoutError(f"{who} did not answer in time ({limits})"), "timeout", FAILING
        if isinstance(raised, openai.APIStatusError):
            return self._status_failure(raised.status_code, _said(raised), raised.response.headers)
        if isinstance(raised, openai.APIConnectionError):
            cause = raised.__cause__
            kind = UnansweredCall if isinstance(cause, httpx2.ConnectError) else ProviderError
            return kind(f"{who} cannot be reached ({type(cause).__name__}: {cause})"), "unreachable", FAILING
        if isinstance(raised, httpx2.TransportError):
            message = f"{who} broke off its answer ({type(raised).__name__}: {raised})"
            return ProviderError(message), "unreachable", FAILING
        if isinstance(raised, openai.APIError):  # an error event in the stream
            return ProviderError(f"{who} broke off its answer: {raised.message}"), "server_error", FAILING
        return None, None, UNKNOWN

    def _status_failure(
        self, status: int, said: str, headers: Mapping[str, str]
    ) -> tuple[ModelServiceError, str, str]:
        who = self.who
        if status == 429:
            return OverloadedError(f"{who} is busy (429): {said}", retry_after_s(headers)), "rate_limited", HEALTHY
        if status >= 500:
            kind = UnansweredCall if status in NOT_DONE_STATUSES else ProviderError
            return kind(f"{who} answered {status}: {said}"), "server_error", FAILING
        if status in REQUEST_REFUSED_STATUSES:
            return InvalidRequestError(f"{who} refused the request ({status}): {said}"), "refused", HEALTHY
        if status in (401, 403):
            message = f"{who} refused this service's key, from {self.entry.api_key_env} ({status}): {said}"
            return ProviderError(message), "refused", HEALTHY
        message = f"{who} answered {status} for its model {self.entry.model!r}: {said}"
        return ProviderError(message), "refused", HEALTHY


def external_models(entries: list[ProviderEntry], environ: Mapping[str, str]) -> dict[str, OpenAICompatibleProvider]:
    """A provider for each entry, its key read from the variable it names (checked when the file was read)."""
    return {entry.model_id: OpenAICompatibleProvider(entry, environ[entry.api_key_env]) for entry in entries}
