"""The OpenAI-compatible API (/v1) through a real `bentoml serve`, called with the official `openai`
package, plus httpx for the raw SSE framing."""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import jsonschema
import openai
import pytest

from .server import start, wait_for_empty_batch

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
MAX_NEW_TOKENS = 10  # the service's default
END_OF_TURN = "<|im_end|>"  # SmolLM2's end of sequence in chat, the last token of an answer that stops
NO_CHANCE = -9999.0  # OpenAI's logprob of a token a grammar ruled out


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


def assert_greedy_logprobs(tokens, top_logprobs: int) -> None:
    """Each token's logprob and alternatives, as temperature 0 chose them: the likeliest."""
    for token in tokens:
        alternatives = [alternative.logprob for alternative in token.top_logprobs]
        assert len(alternatives) == top_logprobs and alternatives == sorted(alternatives, reverse=True)
        assert token.logprob <= 0 and token.token == token.top_logprobs[0].token
        assert token.logprob == pytest.approx(alternatives[0])
        assert math.fsum(math.exp(logprob) for logprob in alternatives) <= 1 + 1e-4
        assert bytes(token.bytes).decode() == token.token  # ASCII answers: whole characters


def test_chat_logprobs_cover_every_token_with_the_top_alternatives(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, logprobs=True, top_logprobs=5
    )
    tokens = completion.choices[0].logprobs.content
    assert len(tokens) == completion.usage.completion_tokens
    assert "".join(token.token for token in tokens[:-1]) == completion.choices[0].message.content
    assert tokens[-1].token == END_OF_TURN and completion.choices[0].finish_reason == "stop"
    assert_greedy_logprobs(tokens, 5)


def test_streamed_chat_logprobs_come_with_the_text_they_made(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    pieces = [chunk.choices[0] for chunk in stream if chunk.choices[0].logprobs is not None]
    streamed = [token for piece in pieces for token in piece.logprobs.content]
    for piece in pieces:
        texts = "".join(token.token for token in piece.logprobs.content if token.token != END_OF_TURN)
        assert texts == piece.delta.content
    assert [token.token for token in streamed] == [token.token for token in whole.choices[0].logprobs.content]
    assert [token.logprob for token in streamed] == pytest.approx(
        [token.logprob for token in whole.choices[0].logprobs.content], abs=1e-3
    )
    assert_greedy_logprobs(streamed, 2)


def test_completion_logprobs_in_the_legacy_shape_streamed_and_not(client):
    asked = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=3)
    whole = client.completions.create(**asked)
    pieces = [chunk.choices[0] for chunk in client.completions.create(**asked, stream=True)]
    choice = whole.choices[0]
    logprobs = choice.logprobs
    assert choice.finish_reason == "length" and len(logprobs.tokens) == whole.usage.completion_tokens == 6
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:index])) for index in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == max(top.values())  # greedy: the likeliest
    streamed = [piece.logprobs for piece in pieces if piece.logprobs is not None]
    assert [token for part in streamed for token in part.tokens] == logprobs.tokens
    assert [offset for part in streamed for offset in part.text_offset] == logprobs.text_offset
    streamed_logprobs = [value for part in streamed for value in part.token_logprobs]
    assert streamed_logprobs == pytest.approx(logprobs.token_logprobs, abs=1e-3)


def test_priority_is_taken_by_name_or_number(client):
    for priority in ("interactive", "batch", -100, 100):
        answer = client.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, extra_body={"priority": priority}
        )
        assert answer.choices[0].message.content == "The capital of France is Paris."
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model=MODEL, messages=FRANCE, extra_body={"priority": "urgent"})
    assert refused.value.param == "priority" and "'urgent'" in refused.value.message


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
    assert {"200", "404", "413", "422", "429", "500", "502", "503", "504", "507"} == set(chat["responses"])
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


@pytest.fixture(scope="module")
def long_client(small_service) -> openai.OpenAI:
    """A client of the service whose MAX_NEW_TOKENS lets a JSON answer finish."""
    with openai.OpenAI(base_url=f"{small_service.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def closed(properties: dict, **extra) -> dict:
    """An object schema with every property required and no others: a small model may otherwise add keys forever."""
    required = list(properties)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False, **extra}


SHORT = {"type": "string", "maxLength": 20}
# Strings are bounded (maxLength, enum, pattern) so that a 135M model's answer ends within max_tokens.
SCHEMAS = {
    "string": closed({"answer": SHORT}),
    "enum": closed({"color": {"enum": ["red", "green", "blue"]}}),
    "boolean": closed({"is_capital": {"type": "boolean"}}),
    "bounded_integer": closed({"year": {"type": "integer", "minimum": 1000, "maximum": 2100}}),
    "two_fields": closed({"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "array_of_enums": closed({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}}),
    "nested_object": closed({"city": closed({"name": SHORT, "country": SHORT})}),
    "const": closed({"kind": {"const": "greeting"}, "text": {"type": "string", "maxLength": 30}}),
    "nullable": closed({"nickname": {"type": ["string", "null"], "maxLength": 10}}),
    "any_of": closed({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
    "pattern": closed({"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
    "array_of_objects": closed(
        {"items": {"type": "array", "items": closed({"id": {"type": "integer", "minimum": 0, "maximum": 99}}), "maxItems": 2}}
    ),
    "root_enum": {"enum": ["yes", "no", "maybe"]},
    "root_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5},
    "date_pattern": closed({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
    "integer_enum": closed({"rating": {"enum": [1, 2, 3, 4, 5]}}),
    "refs": {
        "$defs": {"pet": closed({"species": {"enum": ["cat", "dog"]}, "name": {"type": "string", "maxLength": 12}})},
        **closed({"pet": {"$ref": "#/$defs/pet"}}),
    },
    "three_booleans": closed({"big": {"type": "boolean"}, "old": {"type": "boolean"}, "famous": {"type": "boolean"}}),
    "array_of_strings": closed({"words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}}),
    "root_string": {"type": "string", "minLength": 2, "maxLength": 12},
}
PARIS = [{"role": "user", "content": "Describe Paris briefly, in JSON."}]


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_answers_follow_a_json_schema(long_client, schema):
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    completion = long_client.chat.completions.create(
        model=MODEL, messages=PARIS, temperature=0, max_tokens=200, response_format=response_format
    )
    assert completion.choices[0].finish_reason == "stop", completion.choices[0].message.content
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_vllms_guided_json_takes_a_schema_as_text_on_completions_streamed(long_client):
    schema = SCHEMAS["two_fields"]
    chunks = list(
        long_client.completions.create(
            model=MODEL, prompt="A person, as JSON:", temperature=0.8, seed=7, max_tokens=200, stream=True,
            extra_body={"guided_json": json.dumps(schema)},
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(chunk.choices[0].text for chunk in chunks)), schema)


def test_json_object_gives_a_json_object(long_client):
    messages = [{"role": "user", "content": 'Give the capital of France as a JSON object with the key "capital".'}]
    completion = long_client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=200, response_format={"type": "json_object"}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


CHOICES = ["yes", "no", "maybe"]
QUESTIONS = [
    "Is Paris the capital of France?",
    "Is the sea made of cheese?",
    "Will it rain tomorrow?",
    "Tell me a story about a dragon.",
    "What is 2 + 2?",
]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_guided_choice_never_answers_outside_its_choices(long_client, temperature):
    for seed, question in enumerate(QUESTIONS):
        completion = long_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=temperature, seed=seed,
            max_tokens=50, extra_body={"guided_choice": CHOICES},
        )
        assert completion.choices[0].message.content in CHOICES and completion.choices[0].finish_reason == "stop"


def test_a_grammar_rules_out_tokens_in_the_logprobs(long_client):
    completion = long_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=50,
        logprobs=True, top_logprobs=20, extra_body={"guided_choice": ["yes", "no"]},
    )
    first = completion.choices[0].logprobs.content[0]
    allowed = [alternative for alternative in first.top_logprobs if alternative.logprob > NO_CHANCE]
    ruled_out = first.top_logprobs[len(allowed) :]
    assert 2 <= len(allowed) < 20 and all(alternative.logprob == NO_CHANCE for alternative in ruled_out)
    assert math.fsum(math.exp(alternative.logprob) for alternative in allowed) == pytest.approx(1, abs=1e-3)


PATTERNS = [r"[0-9]{3}-[a-z]{2,4}", r"(Paris|London|Rome)\.", r"[A-Z][a-z]{1,10}( [a-z]{1,10}){0,3}\."]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_guided_regex_answers_match_it_whole(long_client, pattern):
    completion = long_client.chat.completions.create(
        model=MODEL, messages=PARIS, temperature=0, max_tokens=100, extra_body={"guided_regex": pattern}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert re.fullmatch(pattern, completion.choices[0].message.content), completion.choices[0].message.content


NONSENSE = {"type": "object", "properties": {"a": {"type": "nonsense"}}}


@pytest.mark.parametrize(
    "asked, field",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": NONSENSE}}},
            "response_format.json_schema.schema",
        ),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ],
    ids=["schema", "regex"],
)
def test_a_grammar_that_cannot_compile_is_refused_naming_its_field(long_client, asked, field):
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as refused:
        long_client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=50, **asked)
    assert refused.value.param == field and field in refused.value.message


# A character of the Supplementary Private Use Area whose lead byte (0xF1) no token of SmolLM2's
# byte-level vocabulary holds: no output can satisfy the grammar, found by the fuzz suite.
UNWRITABLE = "\U00040000"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_grammar_the_tokenizer_cannot_write_is_refused_naming_its_field(long_client, stream):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        answer = long_client.completions.create(
            model=MODEL, prompt="0", max_tokens=8, stream=stream, extra_body={"guided_choice": [UNWRITABLE]}
        )
        list(answer) if stream else answer
    assert refused.value.param == "guided_choice"
    assert "tokenizer cannot write" in refused.value.message
