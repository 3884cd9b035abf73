"""The OpenAI-compatible app (api/openai.py) over the real domain services and fake ports: request
mapping, response and chunk shapes, SSE framing, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace

import openai.types
import openai.types.chat
import pytest
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from api.openai import UnroutedPathMiddleware, build_openai_app
from api.openai_schemas import MAX_REGEX_CHARS, MAX_SCHEMA_BYTES
from domain import (
    ChatMessage,
    GenerateTextUseCase,
    Generation,
    GenerationParams,
    GenerationTimeoutError,
    GuidedDecoding,
    InvalidRequestError,
    ModelService,
    OverloadedError,
    Prompt,
    PromptBuilder,
    TextDelta,
    TokenLogprob,
)
from tests.unit.fakes import LIMITS, SYSTEM_PROMPT, TEST_MODEL_ID, FakeModelRepository

MAX_BODY_BYTES = 4096
STREAM_STALL_TIMEOUT_S = 10.0  # no test here stops reading a stream
HELLO = [{"role": "user", "content": "hello there"}]
END = "</s>"  # ScoresTokens' end of sequence


class BreaksMidStream(FakeModelRepository):
    """Sends its first word, then times out."""

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        yield "hello"
        raise GenerationTimeoutError("generation passed MAX_GENERATION_TIME=30s and was stopped")


def scored(text: str, alternatives: int) -> TokenLogprob:
    """A token chosen at logprob -0.5 as the likeliest at its position; the last of its other
    alternatives had no chance at all."""
    others = [TokenLogprob(f"#{rank}", tuple(f"#{rank}".encode()), -float(rank)) for rank in range(1, alternatives)]
    if others:
        others[-1] = replace(others[-1], logprob=float("-inf"))
    chosen = TokenLogprob(text, tuple(text.encode()), -0.5)
    return replace(chosen, top=(chosen, *others)[:alternatives])


class ScoresTokens(FakeModelRepository):
    """Answers as the fake does, a token per word (with its space) and its logprobs, then an end of
    sequence whose piece of text is empty. Only for requests that ask for logprobs."""

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        async for item in super().stream_text(model_id, prompt, params):
            if isinstance(item, Generation):
                pieces = [*re.findall(r" ?[^ ]+", item.text), ""]
                tokens = tuple(scored(piece or END, params.logprobs) for piece in pieces)
                for piece, token in zip(pieces, tokens):
                    yield TextDelta(piece, (token,))
                yield replace(item, logprobs=tokens, completion_tokens=len(tokens))


class RefusesGrammars(FakeModelRepository):
    """Refuses every grammar as the engine refuses one it cannot compile: naming the field that asked."""

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        if params.guided is not None:
            raise InvalidRequestError(f"{params.guided.field}: cannot compile a grammar from it")
        async for item in super().stream_text(model_id, prompt, params):
            yield item


def client_for(repository: FakeModelRepository, service: ModelService, max_body_bytes: int = MAX_BODY_BYTES) -> TestClient:
    generate_text = GenerateTextUseCase(service, repository, PromptBuilder(SYSTEM_PROMPT), LIMITS, auto_load=True)
    backend = SimpleNamespace(generate_text=generate_text, models=service)
    return TestClient(build_openai_app(lambda: backend, max_body_bytes, STREAM_STALL_TIMEOUT_S))


@pytest.fixture
def client(repository, service) -> TestClient:
    return client_for(repository, service)


@pytest.fixture
def scoring(catalog, monitor) -> TestClient:
    repository = ScoresTokens(catalog)
    return client_for(repository, ModelService(repository, monitor, TEST_MODEL_ID))


def chat(client: TestClient, **body) -> dict:
    response = client.post("/chat/completions", json={"model": TEST_MODEL_ID, "messages": HELLO, **body})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status: int, code: str) -> dict:
    """Asserts OpenAI's error shape; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]


def sse_events(response) -> list[str]:
    """The raw `data:` payloads, checking that every event is framed `data: ...\\n\\n`."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames[:-1]), frames
    return [frame[len("data: ") :] for frame in frames[:-1]]


class TestChatCompletions:
    def test_answers_a_chat_completion_with_usage(self, client, repository) -> None:
        body = chat(client)

        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == TEST_MODEL_ID and isinstance(body["created"], int)
        assert body["choices"] == [
            {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "logprobs": None, "finish_reason": "stop"}
        ]
        assert body["usage"] == {
            "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}
        }

    def test_the_messages_reach_the_model_as_given_with_developer_as_system(self, client, repository) -> None:
        messages = [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "ok", "name": "bot"},
            {"role": "user", "content": "three"},
        ]
        chat(client, messages=messages)

        (model_id, prompt, _), = repository.generations
        assert model_id == TEST_MODEL_ID
        assert prompt == Prompt(
            (ChatMessage("system", "be brief"), ChatMessage("user", "one\ntwo"), ChatMessage("assistant", "ok"), ChatMessage("user", "three"))
        )  # the service's own system prompt is not added

    def test_sampling_parameters_reach_the_engine_and_max_tokens_is_capped(self, client, repository) -> None:
        chat(client, max_tokens=500, temperature=0.7, top_p=0.9, stop="\n", seed=-5, n=1, user="u-1", frequency_penalty=0)
        chat(client, max_completion_tokens=3, stop=["a", "b"])

        first, second = (params for _, _, params in repository.generations)
        assert first == GenerationParams(
            max_new_tokens=LIMITS.max_new_tokens, temperature=0.7, timeout_s=LIMITS.max_generation_time_s,
            top_p=0.9, stop=("\n",), seed=-5,
        )
        assert second.max_new_tokens == 3 and second.stop == ("a", "b")
        assert second.temperature == LIMITS.default_temperature and second.top_p == 1.0 and second.seed is None

    def test_streams_chunks_then_done(self, client) -> None:
        request = {"model": TEST_MODEL_ID, "messages": HELLO, "stream": True}
        events = sse_events(client.post("/chat/completions", json=request))

        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
        assert len({chunk["id"] for chunk in chunks}) == 1 and all("usage" not in chunk for chunk in chunks)
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(delta["content"] for delta in deltas[1:-1]) == "hellothere"  # the fake sends words
        assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
        assert all(chunk["choices"][0]["logprobs"] is None for chunk in chunks)

    def test_include_usage_adds_a_last_chunk_with_usage_and_no_choices(self, client) -> None:
        request = {"model": TEST_MODEL_ID, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        *chunks, done = sse_events(client.post("/chat/completions", json=request))

        chunks = [json.loads(chunk) for chunk in chunks]
        assert done == "[DONE]"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
        assert all(chunk["usage"] is None for chunk in chunks[:-1])


class TestCompletions:
    def test_a_prompt_is_raw_text_for_the_model_to_continue(self, client, repository) -> None:
        response = client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": ["Once upon"], "max_tokens": 4})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["choices"] == [{"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "stop"}]
        (_, prompt, params), = repository.generations
        assert prompt == Prompt.raw("Once upon") and params.max_new_tokens == 4

    def test_streams_text_chunks_then_done(self, client) -> None:
        events = sse_events(client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": "a b c", "stream": True}))

        chunks = [json.loads(event) for event in events[:-1]]
        assert events[-1] == "[DONE]"
        assert [chunk["choices"][0]["text"] for chunk in chunks] == ["a", "b", "c", ""]
        assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "stop"]
        assert {chunk["object"] for chunk in chunks} == {"text_completion"}


def chunk_choices(response) -> list[dict]:
    return [json.loads(event)["choices"][0] for event in sse_events(response)[:-1]]


class TestLogprobs:
    def test_chat_logprobs_are_in_openais_shape_with_the_top_alternatives(self, scoring) -> None:
        body = chat(scoring, logprobs=True, top_logprobs=2)

        openai.types.chat.ChatCompletion.model_validate(body)
        logprobs = body["choices"][0]["logprobs"]
        assert logprobs["refusal"] is None
        assert [token["token"] for token in logprobs["content"]] == ["hello", " there", END]
        hello = logprobs["content"][0]
        assert hello == {
            "token": "hello",
            "logprob": -0.5,
            "bytes": list(b"hello"),
            "top_logprobs": [
                {"token": "hello", "logprob": -0.5, "bytes": list(b"hello")},
                {"token": "#1", "logprob": -9999.0, "bytes": list(b"#1")},  # -inf, OpenAI's way
            ],
        }

    def test_logprobs_alone_give_no_alternatives_and_none_asked_give_none(self, scoring, client) -> None:
        alone = chat(scoring, logprobs=True)["choices"][0]["logprobs"]["content"]
        unasked = chat(client, logprobs=False)

        assert len(alone) == 3 and all(token["top_logprobs"] == [] for token in alone)
        assert unasked["choices"][0]["logprobs"] is None

    def test_the_top_logprobs_asked_reach_the_engine(self, scoring, client, repository) -> None:
        chat(client, logprobs=True, top_logprobs=5)
        chat(client, logprobs=True)
        chat(client)
        client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": "hi", "logprobs": 3})

        assert [params.logprobs for _, _, params in repository.generations] == [5, 0, None, 3]

    def test_each_chat_chunk_carries_the_logprobs_of_its_own_tokens(self, scoring) -> None:
        request = {"model": TEST_MODEL_ID, "messages": HELLO, "stream": True, "logprobs": True, "top_logprobs": 1}
        events = sse_events(scoring.post("/chat/completions", json=request))

        for event in events[:-1]:
            openai.types.chat.ChatCompletionChunk.model_validate_json(event)
        opening, *pieces, last = [json.loads(event)["choices"][0] for event in events[:-1]]
        assert opening["logprobs"] is None and last["logprobs"] is None
        assert [piece["delta"]["content"] for piece in pieces] == ["hello", " there", ""]  # the end makes no text
        assert [[token["token"] for token in piece["logprobs"]["content"]] for piece in pieces] == [["hello"], [" there"], [END]]
        assert pieces[1]["logprobs"]["content"][0]["top_logprobs"] == [{"token": " there", "logprob": -0.5, "bytes": list(b" there")}]

    def test_completion_logprobs_are_in_openais_legacy_shape(self, scoring) -> None:
        response = scoring.post("/completions", json={"model": TEST_MODEL_ID, "prompt": "a bb ccc", "logprobs": 2})

        assert response.status_code == 200, response.text
        openai.types.Completion.model_validate(response.json())
        assert response.json()["choices"][0]["logprobs"] == {
            "tokens": ["a", " bb", " ccc", END],
            "token_logprobs": [-0.5, -0.5, -0.5, -0.5],
            "top_logprobs": [{token: -0.5, "#1": -9999.0} for token in ["a", " bb", " ccc", END]],
            "text_offset": [0, 1, 4, 8],  # the end's text is not in the answer's: it starts at its end
        }

    def test_streamed_completion_logprobs_have_offsets_in_the_whole_text(self, scoring) -> None:
        request = {"model": TEST_MODEL_ID, "prompt": "a bb ccc", "logprobs": 0, "stream": True}
        *pieces, last = chunk_choices(scoring.post("/completions", json=request))

        assert [piece["text"] for piece in pieces] == ["a", " bb", " ccc", ""]
        assert [piece["logprobs"]["text_offset"] for piece in pieces] == [[0], [1], [4], [8]]
        assert [piece["logprobs"]["top_logprobs"] for piece in pieces] == [
            [{"a": -0.5}], [{" bb": -0.5}], [{" ccc": -0.5}], [{END: -0.5}]
        ]  # the chosen token's, always
        assert last == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}

    def test_a_stream_without_logprobs_asked_has_none(self, client) -> None:
        pieces = chunk_choices(client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": "a b", "stream": True}))

        assert [piece["logprobs"] for piece in pieces] == [None, None, None]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
SCHEMA_TEXT = '{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}}}'  # in its order


class TestStructuredOutput:
    @pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
    @pytest.mark.parametrize(
        "change, guided",
        [
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}},
                GuidedDecoding("json_schema", SCHEMA_TEXT, "response_format.json_schema.schema"),
            ),
            ({"response_format": {"type": "json_object"}}, GuidedDecoding("json_object", "", "response_format")),
            ({"response_format": {"type": "text"}}, None),
            ({"response_format": {"type": "text"}, "guided_regex": "a+"}, GuidedDecoding("regex", "a+", "guided_regex")),
            ({"guided_json": SCHEMA}, GuidedDecoding("json_schema", SCHEMA_TEXT, "guided_json")),
            ({"guided_json": json.dumps(SCHEMA, indent=2)}, GuidedDecoding("json_schema", SCHEMA_TEXT, "guided_json")),
            ({"guided_regex": r"\d{3}"}, GuidedDecoding("regex", r"\d{3}", "guided_regex")),
            ({"guided_choice": ["yes", "no"]}, GuidedDecoding("choice", '["yes", "no"]', "guided_choice")),
        ],
    )
    def test_each_way_to_ask_reaches_the_engine_as_one_grammar(self, client, repository, path, change, guided) -> None:
        prompt = {"messages": HELLO} if path == "/chat/completions" else {"prompt": "hi"}
        response = client.post(path, json={"model": TEST_MODEL_ID, **prompt, **change})

        assert response.status_code == 200, response.text
        (_, _, params), = repository.generations
        assert params.guided == guided

    @pytest.mark.parametrize("priority, value", [("interactive", -10), ("batch", 10), (-100, -100), (None, 0)])
    def test_priority_reaches_the_engine_by_name_or_number(self, client, repository, priority, value) -> None:
        chat(client, priority=priority)

        (_, _, params), = repository.generations
        assert params.priority == value


class TestModels:
    def test_lists_every_model_in_the_store(self, client) -> None:
        body = client.get("/models").json()

        assert body["object"] == "list"
        assert {card["id"] for card in body["data"]} == {"default-model", TEST_MODEL_ID}
        assert all(card["object"] == "model" and card["owned_by"] == "ai-model" for card in body["data"])

    def test_gets_one_model_or_404(self, client) -> None:
        assert client.get(f"/models/{TEST_MODEL_ID}").json()["id"] == TEST_MODEL_ID
        error = error_of(client.get("/models/no-such-model"), 404, "model_not_found")
        assert "no-such-model" in error["message"]


class TestErrors:
    def test_an_unknown_model_is_404_naming_the_model_and_what_exists(self, client) -> None:
        response = client.post("/chat/completions", json={"model": "no-such-model", "messages": HELLO})

        error = error_of(response, 404, "model_not_found")
        assert error["param"] == "model" and error["type"] == "invalid_request_error"
        assert "'no-such-model'" in error["message"] and TEST_MODEL_ID in error["message"]

    @pytest.mark.parametrize(
        "change, param, fragments",
        [
            ({"n": 2}, "n", ["only 1 is supported", "got 2"]),
            ({"max_tokens": 5000}, "max_tokens", ["less than or equal to 2048", "got 5000"]),
            ({"temperature": 2.5}, "temperature", ["less than or equal to 2", "got 2.5"]),
            ({"top_p": 1.5}, "top_p", ["less than or equal to 1", "got 1.5"]),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4 items", "not 5"]),
            ({"stop": [""]}, "stop.0", ["at least 1 character"]),
            ({"seed": 2**64}, "seed", ["got 18446744073709551616"]),
            ({"presence_penalty": 1}, "presence_penalty", ["only 0 is supported", "got 1"]),
            ({"frequency_penalty": False}, "frequency_penalty", ["valid number", "got False"]),
            ({"logprobs": "yes"}, "logprobs", ["valid boolean", "got 'yes'"]),
            ({"top_logprobs": 2}, "top_logprobs", ["only allowed when logprobs is true", "got 2"]),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["less than or equal to 20", "got 21"]),
            ({"priority": 101}, "priority", ["an integer from -100 to 100", "got 101"]),
            ({"priority": "urgent"}, "priority", ["['batch', 'interactive', 'normal']", "got 'urgent'"]),
            ({"priority": 1.0}, "priority", ["got 1.0"]),
            ({"response_format": {"type": "xml"}}, "response_format.type", ["'json_schema'", "got 'xml'"]),
            ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["required when type is"]),
            (
                {"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}},
                "response_format.json_schema",
                ["only allowed when type is 'json_schema'", "got type 'json_object'"],
            ),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
                "response_format.json_schema.name",
                ["should match pattern", "got 'a b'"],
            ),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "a" * 65, "schema": {}}}},
                "response_format.json_schema.name",
                ["at most 64 characters"],
            ),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}},
                "response_format.json_schema.schema",
                ["must be a JSON object (a JSON schema), got str"],
            ),
            ({"guided_json": "{not json"}, "guided_json", ["a JSON schema or its JSON text", "not JSON"]),
            ({"guided_json": "[1]"}, "guided_json", ["must be a JSON object (a JSON schema), got list"]),
            ({"guided_json": 3}, "guided_json", ["got int"]),
            ({"guided_regex": ""}, "guided_regex", ["at least 1 character"]),
            ({"guided_choice": []}, "guided_choice", ["at least 1 item", "got []"]),
            ({"guided_choice": ["yes", ""]}, "guided_choice.1", ["at least 1 character"]),
            ({"guided_choice": ["a"] * 65}, "guided_choice", ["at most 64 items", "not 65"]),
            ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", ["at most one of", "got guided_regex too"]),
            (
                {"response_format": {"type": "json_object"}, "guided_json": {}},
                "guided_json",
                ["at most one of response_format (json_object or json_schema), guided_json", "got response_format too"],
            ),
            ({"stream_options": {"include_usage": True}}, "stream_options", ["only allowed when stream is true"]),
            ({"tools": []}, "tools", ["unknown field"]),
            ({"messages": []}, "messages", ["at least 1 item"]),
            ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", ["got 'tool'"]),
            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", ["only text content parts"]),
            ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", ["not both", "got 4", "max_tokens 3"]),
        ],
    )
    def test_invalid_chat_bodies_answer_422_naming_the_field_limit_and_value(self, client, change, param, fragments) -> None:
        response = client.post("/chat/completions", json={"model": TEST_MODEL_ID, "messages": HELLO, **change})

        error = error_of(response, 422, "validation_error")
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{param}: ")
        assert all(fragment in error["message"] for fragment in fragments), error["message"]

    @pytest.mark.parametrize(
        "change, param, fragments",
        [
            ({"logprobs": 21}, "logprobs", ["less than or equal to 20", "got 21"]),
            ({"logprobs": True}, "logprobs", ["valid integer", "got True"]),
            ({"guided_regex": "a", "guided_json": {}}, "guided_regex", ["got guided_json too"]),
        ],
    )
    def test_invalid_completion_bodies_answer_422_naming_the_field_limit_and_value(
        self, client, change, param, fragments
    ) -> None:
        response = client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": "hi", **change})

        error = error_of(response, 422, "validation_error")
        assert error["param"] == param and error["message"].startswith(f"{param}: ")
        assert all(fragment in error["message"] for fragment in fragments), error["message"]

    @pytest.mark.parametrize(
        "change, param, size",
        [
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {"x": "é" * 40000}}}},
                "response_format.json_schema.schema",
                f"at most {MAX_SCHEMA_BYTES} bytes as JSON text, got 80008",  # é is two bytes
            ),
            ({"guided_json": json.dumps({"x": "a" * MAX_SCHEMA_BYTES})}, "guided_json", "got 65544"),
            ({"guided_regex": "a" * (MAX_REGEX_CHARS + 1)}, "guided_regex", f"at most {MAX_REGEX_CHARS} characters"),
        ],
    )
    def test_a_grammar_past_its_size_limit_is_refused_naming_the_limit_and_size(
        self, repository, service, change, param, size
    ) -> None:
        roomy = client_for(repository, service, max_body_bytes=4 * MAX_SCHEMA_BYTES)
        response = roomy.post("/chat/completions", json={"model": TEST_MODEL_ID, "messages": HELLO, **change})

        error = error_of(response, 422, "validation_error")
        assert error["param"] == param and size in error["message"], error["message"]

    def test_a_grammar_the_engine_cannot_compile_is_422_naming_the_field(self, catalog, monitor) -> None:
        repository = RefusesGrammars(catalog)
        client = client_for(repository, ModelService(repository, monitor, TEST_MODEL_ID))
        schema = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
        response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        request = {"model": TEST_MODEL_ID, "messages": HELLO, "response_format": response_format}

        whole = error_of(client.post("/chat/completions", json=request), 422, "validation_error")
        streamed = error_of(client.post("/chat/completions", json={**request, "stream": True}), 422, "validation_error")

        assert whole == streamed
        assert whole["param"] == "response_format.json_schema.schema"
        assert whole["message"] == "response_format.json_schema.schema: cannot compile a grammar from it"

    @pytest.mark.parametrize(
        "change, param",
        [({"min_tokens": 3}, "min_tokens"), ({"ignore_eos": True}, "ignore_eos")],
    )
    def test_a_grammar_with_min_tokens_or_ignore_eos_is_refused_naming_both(self, client, change, param) -> None:
        request = {"model": TEST_MODEL_ID, "prompt": "hi", "guided_regex": "a+", **change}

        error = error_of(client.post("/completions", json=request), 422, "validation_error")

        assert error["param"] == param and "(guided_regex)" in error["message"]

    def test_a_refusal_by_the_domain_names_its_field_as_param(self, client) -> None:
        request = {"model": TEST_MODEL_ID, "prompt": "hi", "max_tokens": 2, "min_tokens": 3}

        error = error_of(client.post("/completions", json=request), 422, "validation_error")

        assert error["param"] == "min_tokens" and "max_length (max_tokens), 2, got 3" in error["message"]

    @pytest.mark.parametrize(
        "prompt, fragment",
        [(["a", "b"], "a list of one string"), ([1, 2], "a list of one string"), ("", "at least 1 character"), ("a\x00", "NUL")],
    )
    def test_invalid_prompts_answer_422(self, client, prompt, fragment) -> None:
        error = error_of(client.post("/completions", json={"model": TEST_MODEL_ID, "prompt": prompt}), 422, "validation_error")
        assert error["param"] == "prompt" and fragment in error["message"]

    def test_missing_fields_are_named(self, client) -> None:
        error = error_of(client.post("/chat/completions", json={}), 422, "validation_error")
        assert error["message"] == "model: required field is missing; messages: required field is missing"

    def test_malformed_and_oversized_bodies_answer_in_openai_shape(self, client) -> None:
        malformed = error_of(client.post("/chat/completions", content=b'{"model": '), 422, "validation_error")
        listed = error_of(client.post("/completions", content=b"[1]"), 422, "validation_error")
        oversized = error_of(client.post("/completions", content=b" " * (MAX_BODY_BYTES + 1)), 413, "payload_too_large")

        assert malformed["message"].startswith("body: must be JSON") and malformed["param"] is None
        assert listed["message"] == "body: must be a JSON object, got list"
        assert str(MAX_BODY_BYTES) in oversized["message"]

    def test_any_content_type_is_read_as_json(self, client) -> None:
        body = json.dumps({"model": TEST_MODEL_ID, "prompt": "hi"})
        response = client.post("/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"})

        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "hi"

    def test_a_wrong_method_answers_405_in_openai_shape(self, client) -> None:
        response = client.get("/chat/completions")

        assert response.status_code == 405
        assert "GET /chat/completions" in response.json()["error"]["message"]

    def test_an_error_before_the_first_piece_keeps_its_status_when_streaming(self, client, repository) -> None:
        repository.fail_next_generations(OverloadedError)
        response = client.post("/chat/completions", json={"model": TEST_MODEL_ID, "messages": HELLO, "stream": True})

        error = error_of(response, 429, "overloaded")
        assert error["type"] == "rate_limit_error" and response.headers["retry-after"] == "1"

    def test_an_error_mid_stream_is_a_last_error_event_then_done(self, catalog, monitor) -> None:
        repository = BreaksMidStream(catalog)
        client = client_for(repository, ModelService(repository, monitor, TEST_MODEL_ID))
        request = {"model": TEST_MODEL_ID, "prompt": "x", "stream": True}
        *chunks, error, done = sse_events(client.post("/completions", json=request))

        assert [json.loads(chunk)["choices"][0]["text"] for chunk in chunks] == ["hello"]
        assert json.loads(error)["error"]["code"] == "generation_timeout"
        assert json.loads(error)["error"]["type"] == "server_error"
        assert done == "[DONE]"


class TestUnroutedPaths:
    """In the service, BentoML's outer router sees a /v1 path before the app does."""

    @pytest.fixture
    def outer(self) -> TestClient:
        async def outer_router(scope, receive, send) -> None:
            await JSONResponse({"passed_on": scope["path"]})(scope, receive, send)

        openai_app = build_openai_app(lambda: None, MAX_BODY_BYTES, STREAM_STALL_TIMEOUT_S)
        return TestClient(UnroutedPathMiddleware(outer_router, openai_app=openai_app, prefix="/v1"))

    @pytest.mark.parametrize("path", ["/v1/models/a%2Fb", "/v1/models/a%0Ab", "/v1/nothing", "/v1/chat"])
    def test_a_path_the_app_does_not_route_answers_404_in_openai_shape(self, outer, path) -> None:
        response = outer.get(path)

        assert response.status_code == 404
        assert response.json()["error"]["code"] is None and response.json()["error"]["type"] == "invalid_request_error"
        assert "Not Found: GET /v1/" in response.json()["error"]["message"]

    @pytest.mark.parametrize(
        "path", ["/v1/models", "/v1/models/test-model", "/v1/models/", "/v1/chat/completions", "/v1/chat/completions/", "/health", "/v1"]
    )
    def test_routed_paths_trailing_slashes_and_other_paths_pass_on(self, outer, path) -> None:
        assert outer.get(path).json() == {"passed_on": path}
