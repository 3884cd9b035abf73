"""OpenAICompatibleProvider: the real `openai` async client over a scripted provider (httpx2's mock
transport): requests, streamed answers, decisions, and each failure as the service's error, with
retries, the concurrency cap and the circuit breaker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest

from adapters.circuit_breaker import CircuitState
from adapters.providers import OpenAICompatibleProvider, retry_after_s
from adapters.providers_file import ProviderEntry
from domain import (
    ChatMessage,
    ClassifyParams,
    ExternalModelError,
    Generation,
    GenerationParams,
    GenerationTimeoutError,
    GuidedDecoding,
    InvalidRequestError,
    OverloadedError,
    Prompt,
    ProviderError,
    ProviderUnavailableError,
)
from domain.generation import REQUEST_TIMEOUT

MODEL_ID = "remote-model"
KEY = "sk-test-key"
QUESTION = Prompt((ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?")))
PARAMS = GenerationParams(max_new_tokens=8, temperature=0.0, timeout_s=30.0)


def entry(**overrides: Any) -> ProviderEntry:
    fields = {
        "model_id": MODEL_ID,
        "base_url": "http://provider.test/v1",
        "model": "their-model",
        "api_key_env": "REMOTE_KEY",
        "max_retries": 2,
        "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 10.0},
    }
    return ProviderEntry.model_validate({**fields, **overrides})


def events(*chunks: dict[str, Any]) -> httpx2.Response:
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return httpx2.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


def chat_chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict[str, Any]:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "their-model", "choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}}
PARIS = (chat_chunk("Paris"), chat_chunk(" it is."), chat_chunk(finish="stop"), chat_chunk(usage=USAGE))


def status(code: int, message: str = "no", headers: dict[str, str] | None = None) -> httpx2.Response:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return httpx2.Response(code, json=body, headers=headers)


Answer = httpx2.Response | Exception | Callable[[], Any]


@dataclass
class ScriptedProvider:
    """Answers each request with the next scripted answer (a response, an exception to raise, or an
    awaitable's result), and keeps every request it was sent."""

    answers: list[Answer]
    requests: list[httpx2.Request] = field(default_factory=list)

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return await answer()
        return answer

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    script: ScriptedProvider
    provider: OpenAICompatibleProvider
    clock: Clock
    pauses: list[float]


def harness(*answers: Answer, **overrides: Any) -> Harness:
    script = ScriptedProvider(list(answers))
    settings = entry(**overrides)
    client = openai.AsyncOpenAI(
        base_url=settings.base_url,
        api_key=KEY,
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(script)),
    )
    clock, pauses = Clock(), []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    provider = OpenAICompatibleProvider(settings, KEY, client=client, clock=clock, sleep=sleep)
    return Harness(script, provider, clock, pauses)


async def collect(provider: OpenAICompatibleProvider, prompt: Prompt = QUESTION, params: GenerationParams = PARAMS) -> list:
    return [item async for item in provider.stream_text(MODEL_ID, prompt, params)]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


class TestGeneration:
    def test_a_chat_prompt_streams_its_pieces_then_the_whole_generation_under_our_model_id(self) -> None:
        h = harness(events(*PARIS))

        *pieces, generation = run(collect(h.provider))

        assert pieces == ["Paris", " it is."]
        assert isinstance(generation, Generation)
        assert generation.text == "Paris it is." and generation.model_id == MODEL_ID
        assert (generation.prompt_tokens, generation.completion_tokens, generation.cached_prompt_tokens) == (12, 3, 4)
        assert generation.finish_reason == "stop" and generation.max_new_tokens == 8

    def test_the_request_names_the_providers_model_and_carries_the_key(self) -> None:
        h = harness(events(*PARIS))

        run(collect(h.provider))

        request = h.script.requests[0]
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        body = h.script.body()
        assert body["model"] == "their-model" and body["messages"][1] == {"role": "user", "content": "Capital of France?"}
        assert body["max_tokens"] == 8 and body["temperature"] == 0.0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert "top_p" not in body and "seed" not in body and "stop" not in body  # neutral values are not sent

    def test_a_raw_prompt_goes_to_completions_with_vllms_extras(self) -> None:
        chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": " Paris.", "finish_reason": "length", "logprobs": None}]}
        h = harness(events(chunk))
        params = GenerationParams(
            max_new_tokens=4, temperature=0.5, timeout_s=30.0, stop=("\n",), seed=7, min_new_tokens=2,
            guided=GuidedDecoding("regex", "[A-Z][a-z]+", "guided_regex"),
        )

        *pieces, generation = run(collect(h.provider, Prompt.raw("The capital of France is"), params))

        assert h.script.requests[0].url.path == "/v1/completions"
        body = h.script.body()
        assert body["prompt"] == "The capital of France is" and body["stop"] == ["\n"] and body["seed"] == 7
        assert body["min_tokens"] == 2 and body["guided_regex"] == "[A-Z][a-z]+"
        assert pieces == [" Paris."] and generation.finish_reason == "length"

    def test_chat_logprobs_come_back_as_token_logprobs(self) -> None:
        token = {"token": "Paris", "bytes": list(b"Paris"), "logprob": -0.1,
                 "top_logprobs": [{"token": "Paris", "bytes": list(b"Paris"), "logprob": -0.1}]}
        chunk = {**chat_chunk("Paris"), "choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None,
                                                       "logprobs": {"content": [token]}}]}
        h = harness(events(chunk, chat_chunk(finish="stop")))

        *pieces, generation = run(collect(h.provider, params=GenerationParams(8, 0.0, 30.0, logprobs=1)))

        assert h.script.body()["logprobs"] is True and h.script.body()["top_logprobs"] == 1
        assert pieces[0].logprobs[0].token == "Paris" and pieces[0].logprobs[0].top[0].logprob == -0.1
        assert generation.logprobs == pieces[0].logprobs

    def test_loading_or_unloading_it_is_an_external_model_error(self) -> None:
        h = harness()

        for operation in (h.provider.load_model(MODEL_ID), h.provider.unload_model(MODEL_ID)):
            with pytest.raises(ExternalModelError, match="is an external model, served by http://provider.test/v1"):
                run(operation)

    def test_it_lists_as_an_external_model_with_its_circuit(self) -> None:
        model = run(harness().provider.get_model(MODEL_ID))

        assert (model.id, model.kind, model.name, model.is_loaded) == (MODEL_ID, "external", "their-model", False)
        assert model.metadata["circuit"] == "closed" and model.metadata["max_concurrency"] == 16


class TestFailures:
    def test_its_429_is_overloaded_with_its_retry_after_and_is_not_retried(self) -> None:
        h = harness(status(429, "slow down", {"retry-after": "7"}))

        with pytest.raises(OverloadedError, match="provider.test/v1 is busy \\(429\\): slow down") as raised:
            run(collect(h.provider))

        assert raised.value.retry_after_s == 7.0
        assert len(h.script.requests) == 1

    def test_its_503_is_tried_again_after_a_pause(self) -> None:
        h = harness(status(503), events(*PARIS))

        *_, generation = run(collect(h.provider))

        assert generation.text == "Paris it is."
        assert len(h.script.requests) == 2 and len(h.pauses) == 1 and 0.1 <= h.pauses[0] <= 0.2

    def test_its_500_is_a_provider_error_naming_it_and_not_retried(self) -> None:
        h = harness(status(500, "kaput"))

        with pytest.raises(ProviderError, match="provider of 'remote-model' at http://provider.test/v1 answered 500: kaput"):
            run(collect(h.provider))

        assert len(h.script.requests) == 1

    def test_a_refused_connection_is_tried_max_retries_times_more_then_is_a_provider_error(self) -> None:
        h = harness(*[httpx2.ConnectError("connection refused")] * 3)

        with pytest.raises(ProviderError, match="cannot be reached \\(ConnectError: connection refused\\)"):
            run(collect(h.provider))

        assert len(h.script.requests) == 3 and len(h.pauses) == 2 and h.pauses[1] > h.pauses[0] / 2

    def test_no_retry_that_would_end_past_the_requests_deadline(self) -> None:
        h = harness(httpx2.ConnectError("refused"), events(*PARIS))

        with pytest.raises(ProviderError):
            run(collect(h.provider, params=GenerationParams(8, 0.0, timeout_s=0.05)))

        assert len(h.script.requests) == 1 and h.pauses == []

    def test_a_read_timeout_is_a_generation_timeout_naming_its_limits(self) -> None:
        h = harness(httpx2.ReadTimeout("slow"))

        with pytest.raises(GenerationTimeoutError, match="did not answer in time \\(timeout_s 60s, connect_timeout_s 5s\\)"):
            run(collect(h.provider))

        assert len(h.script.requests) == 1

    def test_the_requests_own_deadline_ends_a_slow_answer(self) -> None:
        async def never() -> httpx2.Response:
            await asyncio.sleep(30)

        h = harness(never)
        h.provider = OpenAICompatibleProvider(h.provider.entry, KEY, client=h.provider._client)  # the real clock

        with pytest.raises(GenerationTimeoutError, match="had not answered when the request's time ran out \\(its timeout"):
            run(collect(h.provider, params=GenerationParams(8, 0.0, timeout_s=0.2, timeout_by=REQUEST_TIMEOUT)))

    def test_its_422_is_the_callers_invalid_request(self) -> None:
        h = harness(status(422, "max_tokens: too many"))

        with pytest.raises(InvalidRequestError, match="refused the request \\(422\\): max_tokens: too many"):
            run(collect(h.provider))

    def test_a_refused_key_is_a_provider_error_naming_its_variable(self) -> None:
        h = harness(status(401, "bad key"))

        with pytest.raises(ProviderError, match="refused this service's key, from REMOTE_KEY \\(401\\): bad key"):
            run(collect(h.provider))

    def test_an_error_event_mid_stream_is_a_provider_error_and_not_retried(self) -> None:
        broken = "data: " + json.dumps(chat_chunk("Par")) + "\n\ndata: " + json.dumps(
            {"error": {"message": "engine died", "type": "server_error"}}
        ) + "\n\n"
        h = harness(httpx2.Response(200, content=broken.encode(), headers={"content-type": "text/event-stream"}))
        seen = []

        async def read() -> None:
            async for item in h.provider.stream_text(MODEL_ID, QUESTION, PARAMS):
                seen.append(item)

        with pytest.raises(ProviderError, match="broke off its answer: engine died"):
            run(read())

        assert seen == ["Par"] and len(h.script.requests) == 1

    def test_past_max_concurrency_a_call_waits_for_a_place_then_is_overloaded(self) -> None:
        release = asyncio.Event()

        async def held() -> httpx2.Response:
            await release.wait()
            return events(*PARIS)

        h = harness(held, max_concurrency=1, queue_timeout_s=0.05)
        h.provider = OpenAICompatibleProvider(h.provider.entry, KEY, client=h.provider._client)

        async def two_at_once() -> None:
            first = asyncio.create_task(collect(h.provider))
            await asyncio.sleep(0.01)
            with pytest.raises(OverloadedError, match=r"all of its max_concurrency \(1\) calls in flight"):
                await collect(h.provider)
            release.set()
            await first

        run(two_at_once())


class TestCircuitBreaker:
    def test_opens_after_the_threshold_then_refuses_without_calling_with_the_rest_of_the_cool_down(self) -> None:
        h = harness(*[status(500)] * 3, max_retries=0)
        for _ in range(3):
            with pytest.raises(ProviderError):
                run(collect(h.provider))
        h.clock.now += 4

        with pytest.raises(ProviderUnavailableError, match="failed 3 times in a row: its circuit is open") as raised:
            run(collect(h.provider))

        assert raised.value.retry_after_s == pytest.approx(6.0)
        assert len(h.script.requests) == 3
        assert run(h.provider.get_model(MODEL_ID)).metadata["circuit"] == "open"

    def test_after_the_cool_down_one_probe_goes_and_its_success_closes_it(self) -> None:
        h = harness(*[status(500)] * 3, events(*PARIS), max_retries=0)
        for _ in range(3):
            with pytest.raises(ProviderError):
                run(collect(h.provider))
        h.clock.now += 10

        assert h.provider.breaker.state is CircuitState.HALF_OPEN
        *_, generation = run(collect(h.provider))

        assert generation.text == "Paris it is." and h.provider.breaker.state is CircuitState.CLOSED

    def test_a_429_or_a_refused_request_does_not_count_against_the_provider(self) -> None:
        h = harness(status(429), status(422), status(429), status(422), max_retries=0)
        for expected in (OverloadedError, InvalidRequestError) * 2:
            with pytest.raises(expected):
                run(collect(h.provider))

        assert h.provider.breaker.state is CircuitState.CLOSED

    def test_a_retry_stops_once_the_circuit_opens(self) -> None:
        h = harness(*[httpx2.ConnectError("refused")] * 3, max_retries=5)

        with pytest.raises(ProviderError, match="cannot be reached"):
            run(collect(h.provider))

        assert len(h.script.requests) == 3 and h.provider.breaker.state is CircuitState.OPEN


def decision(*alternatives: tuple[str, float], logprobs: bool = True) -> httpx2.Response:
    top = [{"token": token, "bytes": None, "logprob": logprob} for token, logprob in alternatives]
    content = [{"token": alternatives[0][0], "bytes": None, "logprob": alternatives[0][1], "top_logprobs": top}]
    body = {
        "id": "d", "object": "chat.completion", "created": 1, "model": "their-model",
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": alternatives[0][0]},
                     "logprobs": {"content": content} if logprobs else None}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
    }
    return httpx2.Response(200, json=body)


class TestDecision:
    def test_each_label_gets_the_probability_of_the_first_tokens_that_begin_it_alone(self) -> None:
        h = harness(decision(("Yes", -0.2), (" yes", -2.0), ("No", -1.5), ("Maybe", -3.0)))

        made = run(h.provider.classify(MODEL_ID, QUESTION, ClassifyParams(("yes", "no"), 30.0)))

        body = h.script.body()
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["messages"][-1]["content"].endswith("Answer with exactly one of: yes, no.")
        assert made.label == "yes" and made.model_id == MODEL_ID and made.prompt_tokens == 20
        assert made.probabilities["yes"] == pytest.approx((0.8187 + 0.1353) / (0.8187 + 0.1353 + 0.2231), abs=1e-3)
        assert sum(made.probabilities.values()) == pytest.approx(1.0)

    def test_labels_whose_first_words_begin_alike_are_refused_before_any_call(self) -> None:
        h = harness()

        with pytest.raises(ExternalModelError, match="labels: 'remote-model' is an external model.*'New York' and 'New Jersey'"):
            run(h.provider.classify(MODEL_ID, QUESTION, ClassifyParams(("New York", "New Jersey"), 30.0)))

        assert h.script.requests == []

    def test_a_provider_without_logprobs_is_an_external_model_error(self) -> None:
        h = harness(decision(("Yes", -0.2), logprobs=False))

        with pytest.raises(ExternalModelError, match="gave no log probabilities"):
            run(h.provider.classify(MODEL_ID, QUESTION, ClassifyParams(("yes", "no"), 30.0)))

    def test_no_label_among_the_likeliest_tokens_is_a_provider_error(self) -> None:
        h = harness(decision(("The", -0.1), ("A", -2.0)))

        with pytest.raises(ProviderError, match="no label among its likeliest first tokens \\('The', 'A'"):
            run(h.provider.classify(MODEL_ID, QUESTION, ClassifyParams(("yes", "no"), 30.0)))


@pytest.mark.parametrize(
    "headers, expected",
    [({"retry-after": "3"}, 3.0), ({"retry-after-ms": "1500"}, 1.5), ({}, None), ({"retry-after": "soon"}, None),
     ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0)],
)
def test_retry_after_reads_seconds_milliseconds_or_a_date(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers) == expected
