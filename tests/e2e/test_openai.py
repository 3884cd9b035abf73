"""The OpenAI-compatible API (/v1) through a real `bentoml serve`, called with the official `openai`
package, plus httpx for the raw SSE framing."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .server import start, wait_for_empty_batch

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
MAX_NEW_TOKENS = 10  # the service's default


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    # No retries: a 429 or 5xx must show here, not be retried away.
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_models_lists_the_store(client):
    assert MODEL in [model.id for model in client.models.list()]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "ai-model" and model.created > 0


def test_chat_completion_answers_with_usage_and_finish_reason_stop(client):
    completion = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert completion.model == MODEL and completion.id.startswith("chatcmpl-")
    usage = completion.usage
    assert usage.prompt_tokens > 20 and usage.completion_tokens == 8  # seven text tokens and the end of sequence
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_ends_with_finish_reason_length_and_is_capped_by_max_new_tokens(client):
    short = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=3)
    capped = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_completion_tokens=500)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == MAX_NEW_TOKENS
    assert capped.choices[0].message.content.startswith(short.choices[0].message.content)


@pytest.mark.parametrize("exactly", [{"min_tokens": MAX_NEW_TOKENS}, {"ignore_eos": True}], ids=["min_tokens", "ignore_eos"])
def test_vllms_min_tokens_and_ignore_eos_give_exactly_the_tokens_asked_for(client, exactly):
    completion = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=MAX_NEW_TOKENS, extra_body=exactly
    )
    assert completion.usage.completion_tokens == MAX_NEW_TOKENS  # the answer alone is 8
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content.startswith("The capital of France is Paris")


def test_min_tokens_past_max_tokens_is_refused_naming_both(client):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, extra_body={"min_tokens": 5})
    assert "min_tokens: must be between 0 and max_length (max_tokens), 4, got 5" in refused.value.message


def test_streamed_chat_matches_the_whole_answer_and_ends_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *answer, usage_chunk = chunks
    assert "".join(chunk.choices[0].delta.content or "" for chunk in answer) == whole.choices[0].message.content
    assert answer[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in answer][-1] == "stop"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_completions_continue_raw_text_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, stop="\n")
    streamed = client.completions.create(
        model=MODEL, prompt=["The capital of France is"], temperature=0, stop=["\n"], stream=True
    )
    chunks = list(streamed)
    assert whole.choices[0].text == " Paris." and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens == 5  # the raw prompt, no chat template
    assert "".join(chunk.choices[0].text for chunk in chunks) == " Paris."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_end_the_text_before_them(client):
    counted = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, stop=[", 7", "never"])
    chatted = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stop=" Paris")
    assert counted.choices[0].text == " 5, 6" and counted.choices[0].finish_reason == "stop"
    assert chatted.choices[0].message.content == "The capital of France is"
    assert chatted.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_sampled_text(client):
    def sampled(seed: int, stream: bool = False) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=STORY, temperature=1.0, top_p=0.95, seed=seed, stream=stream
        )
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in answer)
        return answer.choices[0].message.content

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(1234, stream=True) == first
    assert sampled(99) != first


def test_errors_come_as_openais_exceptions_naming_the_field(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.UnprocessableEntityError) as two_choices:
        client.chat.completions.create(model=MODEL, messages=FRANCE, n=2)
    with pytest.raises(openai.UnprocessableEntityError) as too_many_tokens:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert missing.value.param == "model" and "'no-such-model'" in missing.value.message
    assert two_choices.value.param == "n" and "only 1 is supported" in two_choices.value.message
    assert too_many_tokens.value.param == "max_tokens"
    assert "2048" in too_many_tokens.value.message and "5000" in too_many_tokens.value.message


def test_raw_sse_framing_ends_with_done(url):
    body = {"model": MODEL, "messages": FRANCE, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames[:-1])
    chunks = [json.loads(frame[len("data: ") :]) for frame in frames[:-2]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == "The capital of France is Paris."


def test_a_stream_that_cannot_start_answers_json_with_its_status(url):
    body = {"model": "no-such-model", "messages": FRANCE, "stream": True}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "model_not_found"


def test_the_routes_are_in_the_openapi_document_with_their_errors_in_openai_shape(url):
    paths = httpx.get(f"{url}/docs.json", timeout=10).json()["paths"]
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions"} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert "requestBody" in chat
    assert {"200", "404", "413", "422", "429", "500", "503", "504", "507"} == set(chat["responses"])
    assert chat["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorResponse")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/models/a%2Fb", "/v1/models/a%0Ab"])
def test_a_path_under_v1_that_no_route_takes_answers_404_in_openai_shape(url, path):
    response = httpx.get(f"{url}{path}", timeout=10)
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["code"] is None


@pytest.fixture(scope="module")
def small_service(tmp_path_factory):
    """Long generations, and room for two generation requests in one worker."""
    env = {"MAX_NEW_TOKENS": "2000", "MAX_GENERATION_TIME": "120", "MAX_CONCURRENT_REQUESTS": "2", "MAX_PROCESSES": "1"}
    running = start(tmp_path_factory.mktemp("openai") / "serve.log", env)
    yield running
    running.stop()


def test_v1_requests_count_against_the_admission_cap_and_leaving_stops_them(small_service):
    url = small_service.url
    story = {"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 1500}
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        streams = [client.chat.completions.create(**story, stream=True) for _ in range(2)]
        for stream in streams:
            next(iter(stream))  # both are generating
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt="hi")
        generate = httpx.post(f"{url}/generate", json={"query": "hi"}, timeout=60)
        for stream in streams:
            stream.close()
        assert wait_for_empty_batch(url) < 3.0  # the streams' generations stopped when they left

        assert refused.value.code == "overloaded" and refused.value.response.headers["retry-after"] == "1"
        assert generate.status_code == 429  # one count for /generate and /v1

        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=1.5).chat.completions.create(**story)
        assert time.monotonic() - started < 10
        assert wait_for_empty_batch(url) < 3.0  # so did the one that was not streamed
        answer = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
        assert answer.choices[0].message.content == "The capital of France is Paris."
