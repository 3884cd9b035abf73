"""Decisions, log probabilities, the batch form and priorities through a real `bentoml serve`, with
httpx and BentoML's own client."""

from __future__ import annotations

import json

import bentoml
import httpx
import pytest

from .test_http_api import assert_error

QUESTION = "Is this post extremist? Answer yes or no."
POSTS = [
    "Join us and fight back against those traitors, no mercy.",
    "Great work by the volunteers, the park looks clean again.",
    "Does anyone know when the library opens on Sunday?",
    "They are ruining our country and will pay for it one day.",
]


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def decide(http, **body) -> dict:
    response = http.post("/classify", json={"query": QUESTION, "labels": ["yes", "no"], **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_decision_answers_one_of_its_labels_with_every_labels_probability(http):
    decision = decide(http, context=[POSTS[0]], labels=["yes", "no", "not sure"], priority="interactive")

    assert decision["label"] in ("yes", "no", "not sure")
    assert list(decision["probabilities"]) == ["yes", "no", "not sure"]
    assert sum(decision["probabilities"].values()) == pytest.approx(1.0)
    assert decision["label"] == max(decision["probabilities"], key=decision["probabilities"].get)
    assert decision["prompt_tokens"] > 20 and decision["decision_time_ms"] > 0


def test_generate_with_choices_answers_the_likeliest_choice(http):
    body = {"query": QUESTION, "context": [POSTS[1]], "choices": ["Yes", "No"]}

    answer = http.post("/generate", json=body).json()

    assert answer["result"] in ("Yes", "No") and answer["completion_tokens"] == 0
    assert answer["result"] == max(answer["probabilities"], key=answer["probabilities"].get)
    expected = decide(http, context=[POSTS[1]], labels=["Yes", "No"])["probabilities"]
    assert answer["probabilities"] == pytest.approx(expected, abs=1e-4)  # the prefix cache may serve either


def test_a_batch_of_64_decisions_answers_in_order_and_a_bad_item_gets_its_own_error(http):
    items = [{"context": [POSTS[index % len(POSTS)]]} for index in range(64)]
    items[5] = {"context": ["fine"], "mood": "unknown field"}
    items[9] = {"context": ["word " * 6000, "word " * 6000]}  # past the model's context window

    answer = decide(http, items=items)

    results = answer["results"]
    assert len(results) == 64
    assert results[5]["error_type"] == "validation_error" and "items.5.mood: unknown field" in results[5]["error"]
    assert results[9]["error_type"] == "validation_error" and "items.9" in results[9]["error"]
    assert "context window" in results[9]["error"]
    alone = {post: decide(http, context=[post])["probabilities"] for post in POSTS}
    for index, result in enumerate(results):
        if index not in (5, 9):
            assert result["probabilities"] == pytest.approx(alone[POSTS[index % len(POSTS)]], abs=1e-4), index


def test_a_batch_of_generations_answers_in_order_with_each_items_own_query(http):
    items = [{"context": [post]} for post in POSTS] + [{"query": "What is the capital of France?"}]
    body = {"query": QUESTION, "items": items, "max_length": 8, "temperature": 0}

    results = http.post("/generate", json=body).json()["results"]

    singles = [
        http.post("/generate", json={"query": QUESTION, "context": [post], "max_length": 8, "temperature": 0}).json()
        for post in POSTS
    ]
    assert [result["result"] for result in results[:4]] == [single["result"] for single in singles]
    assert "Paris" in results[4]["result"]


def test_generate_returns_each_tokens_logprobs_whole_and_streamed(http):
    body = {
        "query": "Say hello.",
        "max_length": 5,
        "min_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }

    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate/stream", json=body) as response:
        events = [
            json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")
        ]

    assert len(whole["logprobs"]) == 5
    for token in whole["logprobs"]:
        assert token["logprob"] <= 0 and len(token["top_logprobs"]) == 3
        assert token["top_logprobs"][0]["token"] == token["token"]  # greedy
    streamed = [token for event in events[:-1] for token in event["logprobs"]]
    assert streamed == whole["logprobs"] == events[-1]["logprobs"]
    assert "".join(token["token"] for token in streamed).strip() == whole["result"]


def test_bentomls_client_reads_decisions_single_and_batched(url):
    with bentoml.SyncHTTPClient(url) as client:
        single = client.classify(query=QUESTION, context=[POSTS[0]], labels=["yes", "no"])
        batch = client.classify(query=QUESTION, items=[{"context": [post]} for post in POSTS], labels=["yes", "no"])

    assert single["label"] in ("yes", "no")
    assert [result["label"] for result in batch["results"]][0] == single["label"]


@pytest.mark.parametrize(
    ("route", "body", "fragments"),
    [
        ("/classify", {"query": "q"}, ["labels", "required"]),
        ("/classify", {"query": "q", "labels": []}, ["labels", "at least 1"]),
        ("/classify", {"query": "q", "labels": ["x"] * 65}, ["labels", "at most 64", "65"]),
        ("/classify", {"query": "q", "labels": ["yes", ""]}, ["labels.1", "at least 1 character"]),
        ("/classify", {"query": "q", "labels": ["a" * 201]}, ["labels.0", "at most 200 characters"]),
        ("/classify", {"query": "q", "labels": ["yes", "yes"]}, ["labels", "distinct", "'yes'"]),
        ("/classify", {"query": "q", "labels": ["yes", "word " * 30]}, ["labels.1", "16 tokens", "got 31"]),
        ("/classify", {"query": "q", "labels": ["a"], "max_length": 3}, ["max_length", "unknown field"]),
        ("/classify", {"query": "q", "labels": ["a"], "items": [{}] * 65}, ["items", "at most 64", "65"]),
        ("/classify", {"query": "q", "labels": ["a"], "items": [{}], "context": ["c"]}, ["items", "context"]),
        ("/generate", {"query": "q", "choices": ["a", "b"], "max_length": 2}, ["choices", "max_length", "2"]),
        ("/generate", {"query": "q", "choices": ["a", "b"], "logprobs": True}, ["choices", "logprobs"]),
        ("/generate", {"query": "q", "top_logprobs": 2}, ["top_logprobs", "logprobs", "2"]),
        ("/generate", {"query": "q", "logprobs": True, "top_logprobs": 21}, ["top_logprobs", "20", "21"]),
        ("/generate", {"query": "q", "logprobs": "yes"}, ["logprobs", "boolean", "yes"]),
        ("/generate", {"query": "q", "priority": "urgent"}, ["priority", "interactive", "'urgent'"]),
        ("/generate", {"query": "q", "priority": 101}, ["priority", "100", "101"]),
        ("/generate", {"query": "q", "priority": 1.5}, ["priority", "integer", "1.5"]),
        ("/generate/stream", {"query": "q", "items": [{}]}, ["items", "unknown field"]),  # one stream, one answer
        ("/generate/stream", {"query": "q", "choices": ["a", "b"]}, ["choices", "unknown field"]),
    ],
)
def test_invalid_verdict_fields_answer_422_naming_the_field_limit_and_value(http, route, body, fragments):
    assert_error(http.post(route, json=body), 422, "validation_error", *fragments)
