"""Decisions and log probabilities on the bundled model, against the same numbers computed here with
plain transformers (one forward pass over the whole sequence, no engine)."""

from __future__ import annotations

import asyncio
import math

import bentoml
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domain import ClassifyParams, GenerationParams, InvalidRequestError, PromptBuilder

from .support import BUNDLED_MODEL_ID

PROMPT = PromptBuilder().build(
    "Is this post extremist? Answer yes or no.", ["A new bakery opened on Main Street and sells fresh bread."]
)
# "not sure" and "not at all" share their first token; "maybe" and "Maybe" differ only in case.
LABELS = ("yes", "no", "Yes", "No", "maybe", "not sure", "not at all")


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def reference():
    path = bentoml.models.get(BUNDLED_MODEL_ID).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, model


def prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(PROMPT.to_list(), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_probabilities(reference, labels) -> list[float]:
    """Each label's probability over its whole token sequence after the prompt, normalized over the labels."""
    tokenizer, model = reference
    prompt = prompt_ids(tokenizer)
    totals = []
    for label in labels:
        tokens = tokenizer(label, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        totals.append(sum(logprobs[len(prompt) - 1 + offset, token].item() for offset, token in enumerate(tokens)))
    weights = [math.exp(total - max(totals)) for total in totals]
    return [weight / sum(weights) for weight in weights]


def test_a_decision_matches_transformers_over_every_labels_whole_sequence(repository, reference):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))

    decision = run(repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(LABELS, 60)))

    expected = reference_probabilities(reference, LABELS)
    assert list(decision.probabilities) == list(LABELS)
    for label, probability in zip(LABELS, expected):
        assert decision.probabilities[label] == pytest.approx(probability, abs=1e-3), label
    assert decision.label == LABELS[max(range(len(LABELS)), key=expected.__getitem__)]
    assert sum(decision.probabilities.values()) == pytest.approx(1.0)
    assert decision.prompt_tokens == len(prompt_ids(reference[0]))


def test_labels_that_share_a_first_token_are_told_apart_by_the_rest(repository, reference):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    labels = ("Yes", "No", "No, it is not", "No.")

    decision = run(repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(labels, 60)))

    expected = dict(zip(labels, reference_probabilities(reference, labels)))
    for label in labels:
        assert decision.probabilities[label] == pytest.approx(expected[label], rel=1e-2, abs=1e-6), label
    assert decision.probabilities["No"] > decision.probabilities["No."] > 0  # "No." is "No" then "."
    assert decision.probabilities["No, it is not"] != pytest.approx(decision.probabilities["No."], rel=1e-2)


def test_concurrent_decisions_share_batches_and_answer_as_one_alone(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    alone = run(repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(LABELS, 60)))
    steps_before = repository.loaded(BUNDLED_MODEL_ID).core.scheduler.steps

    async def together():
        return await asyncio.gather(
            *(repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(LABELS, 60)) for _ in range(8))
        )

    decisions = run(together())

    for decision in decisions:
        assert decision.label == alone.label
        for label in LABELS:
            assert decision.probabilities[label] == pytest.approx(alone.probabilities[label], abs=1e-4)
    # Alone, a decision takes two steps (first tokens, then the multi-token labels); 8 together share them.
    assert repository.loaded(BUNDLED_MODEL_ID).core.scheduler.steps - steps_before < 8 * 2
    assert decisions[-1].cached_prompt_tokens > 0  # the prompt's blocks came from the prefix cache


def test_a_label_of_too_many_tokens_is_refused_naming_it(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    labels = ("yes", "a very long answer " * 10)

    with pytest.raises(InvalidRequestError, match=r"labels\.1: must be 1 to 16 tokens .* got \d+"):
        run(repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(labels, 60)))


def test_logprobs_are_the_models_own_and_greedy_picks_the_likeliest(repository, reference):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    params = GenerationParams(max_new_tokens=6, temperature=0.0, timeout_s=60, logprobs=5)

    generation = run(repository.generate_text(BUNDLED_MODEL_ID, PROMPT, params))

    tokenizer, model = reference
    generated = tokenizer(generation.text, add_special_tokens=False)["input_ids"]
    assert len(generation.logprobs) == generation.completion_tokens
    assert "".join(logprob.token for logprob in generation.logprobs) == generation.text
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids(tokenizer) + generated])).logits[0]
    expected = torch.log_softmax(logits.double(), dim=-1)
    start = len(prompt_ids(tokenizer)) - 1
    for offset, (token, logprob) in enumerate(zip(generated, generation.logprobs)):
        assert logprob.logprob == pytest.approx(expected[start + offset, token].item(), abs=1e-3)
        assert len(logprob.top) == 5 and logprob.top[0].token == logprob.token  # greedy: the likeliest
        assert [each.logprob for each in logprob.top] == sorted((each.logprob for each in logprob.top), reverse=True)
        assert bytes(logprob.bytes).decode() == logprob.token


def test_a_generation_that_asks_for_no_logprobs_carries_none(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    params = GenerationParams(max_new_tokens=3, temperature=0.0, timeout_s=60)

    assert run(repository.generate_text(BUNDLED_MODEL_ID, PROMPT, params)).logprobs is None


def test_an_urgent_decision_aborts_bulk_steps_which_are_redone_to_the_same_text(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    bulk = GenerationParams(max_new_tokens=24, temperature=0.0, timeout_s=120, min_new_tokens=24, priority=10)
    prompts = [PromptBuilder().build(f"Write a poem about the number {number}.", []) for number in range(6)]

    async def generate_all():
        return await asyncio.gather(*(repository.generate_text(BUNDLED_MODEL_ID, prompt, bulk) for prompt in prompts))

    async def generate_while_deciding():
        work = asyncio.ensure_future(generate_all())
        decisions = []
        while not work.done():  # the engine is busy: nearly every decision arrives while a step runs
            decisions.append(
                await repository.classify(BUNDLED_MODEL_ID, PROMPT, ClassifyParams(LABELS, 60, priority=-10))
            )
            await asyncio.sleep(0.05)
        return await work, decisions

    alone = run(generate_all())
    core = repository.loaded(BUNDLED_MODEL_ID).core
    aborted_before = core.aborted_steps

    interrupted, decisions = run(generate_while_deciding())

    assert core.aborted_steps > aborted_before
    assert [generation.text for generation in interrupted] == [generation.text for generation in alone]
    assert len({decision.label for decision in decisions}) == 1
