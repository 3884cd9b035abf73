"""top_p, seed, stop strings and raw-text prompts: the sampling functions on their own, then each
parameter on the real bundled model, per row inside a mixed batch."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from domain import Generation, GenerationParams, Prompt, PromptBuilder
from engine.core.detokenizer import IncrementalDecoder
from engine.core.sampling import RowSampling, choose_tokens, draw, keep_nucleus, seeded_generator
from engine.models.loader import BatchingOptions
from engine.repository import TransformersModelRepository

from .support import BUNDLED_MODEL_ID, ROOMY, DirectoryCatalog

STORY = PromptBuilder().build("Tell me a short story about a dragon.", [])
FRANCE = PromptBuilder().build("What is the capital of France? Answer in one sentence.", [])
COUNTING = Prompt.raw("1, 2, 3, 4,")
HOT = GenerationParams(max_new_tokens=16, temperature=1.2, timeout_s=120)
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, timeout_s=120)


def run(coroutine):
    return asyncio.run(coroutine)


def params(base: GenerationParams = HOT, **changes) -> GenerationParams:
    return dataclasses.replace(base, **changes)


# The sampling functions.


def test_nucleus_keeps_the_smallest_set_of_likeliest_tokens_reaching_top_p():
    probabilities = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.1, 0.5, 0.3, 0.1], [0.1, 0.5, 0.3, 0.1]])
    kept = keep_nucleus(probabilities, torch.tensor([0.5, 0.75, 1.0]))
    assert kept.tolist()[0] == [0.0, 0.5, 0.0, 0.0]
    assert kept.tolist()[1] == pytest.approx([0.0, 0.5, 0.3, 0.0])
    assert torch.equal(kept[2], probabilities[2])


def test_a_zero_top_p_still_keeps_the_likeliest_token():
    kept = keep_nucleus(torch.tensor([[0.2, 0.7, 0.1]]), torch.tensor([0.0]))
    assert kept.tolist() == [[0.0, pytest.approx(0.7), 0.0]]


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    probabilities = torch.softmax(torch.randn(4, 1000), dim=-1)  # the seeded row is the last

    def seeded_draws(generators_for_others) -> list[int]:
        generator = seeded_generator(1234, torch.device("cpu"))
        batch = probabilities[len(probabilities) - len(generators_for_others) - 1 :]
        return [int(draw(batch, [*generators_for_others, generator])[-1]) for _ in range(20)]

    alone = seeded_draws([])
    assert seeded_draws([None, None, None]) == alone
    assert seeded_draws([None, seeded_generator(99, torch.device("cpu")), None]) == alone
    assert len(set(alone)) > 1  # it really samples


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    rows = [RowSampling(0.0), RowSampling(1.0, top_p=0.0), RowSampling(1e-9)]
    assert choose_tokens(logits, rows) == [1, 1, 0]


def test_the_decoder_holds_back_a_stop_strings_start_and_cuts_before_it(batched):
    tokenizer = batched.loaded(BUNDLED_MODEL_ID).tokenizer
    token_ids = tokenizer(" 5, 6, 7, 8")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, stop=(", 7",))
    deltas = [decoder.push(token_id) for token_id in token_ids]
    assert "".join(deltas) == " 5, 6"
    assert decoder.stopped and decoder.text() == " 5, 6" and decoder.flush() == ""
    assert all(", 7" not in delta for delta in deltas)


def test_text_held_back_for_a_stop_string_that_never_completes_is_flushed(batched):
    tokenizer = batched.loaded(BUNDLED_MODEL_ID).tokenizer
    decoder = IncrementalDecoder(tokenizer, stop=(", 6!",))
    sent = "".join(decoder.push(token_id) for token_id in tokenizer(" 5, 6")["input_ids"])
    assert sent == " 5" and not decoder.stopped
    assert sent + decoder.flush() == decoder.text() == " 5, 6"


# On the real model, in a batch.


@pytest.fixture(scope="module")
def batched():
    with ThreadPoolExecutor(4) as executor:
        repository = TransformersModelRepository(
            DirectoryCatalog({}), executor, ROOMY, batching=BatchingOptions(max_batch_size=32)
        )
        run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
        yield repository
        run(repository.unload_model(BUNDLED_MODEL_ID))


def together(repository, *requests: tuple[Prompt, GenerationParams]) -> list[Generation]:
    async def all_at_once() -> list[Generation]:
        return await asyncio.gather(*(repository.generate_text(BUNDLED_MODEL_ID, p, ps) for p, ps in requests))

    return run(all_at_once())


def test_the_same_seed_gives_the_same_text_alone_and_in_a_mixed_batch(batched):
    seeded = params(seed=42)
    alone = together(batched, (STORY, seeded))[0]
    first, unseeded, greedy, second, other_seed = together(
        batched, (STORY, seeded), (STORY, HOT), (FRANCE, GREEDY), (STORY, seeded), (STORY, params(seed=7))
    )
    assert first.text == second.text == alone.text
    assert first.completion_tokens == HOT.max_new_tokens  # sampled long enough to tell texts apart
    assert other_seed.text != first.text
    assert greedy.text == "The capital of France is Paris."


def test_a_tiny_top_p_is_greedy_while_its_neighbours_sample(batched):
    nucleus_of_one, hot, greedy = together(batched, (FRANCE, params(top_p=1e-6)), (STORY, HOT), (FRANCE, GREEDY))
    assert nucleus_of_one.text == greedy.text == "The capital of France is Paris."
    assert hot.text


def test_top_p_narrows_what_a_seeded_row_samples(batched):
    wide = together(batched, *[(STORY, params(seed=seed, temperature=1.5)) for seed in range(4)])
    narrow = together(batched, *[(STORY, params(seed=seed, temperature=1.5, top_p=0.05)) for seed in range(4)])
    assert len({g.text for g in wide}) == 4
    assert len({g.text for g in narrow}) < 4  # a narrow nucleus leaves the seeds little to choose from


def test_a_stop_string_ends_its_row_only_trimmed_with_finish_reason_stop(batched):
    counting = params(GREEDY, max_new_tokens=20)
    stopped, full, neighbour = together(
        batched, (COUNTING, params(counting, stop=(", 7", "never"))), (COUNTING, counting), (FRANCE, GREEDY)
    )
    assert full.text.startswith(" 5, 6, 7, 8")
    assert stopped.text == " 5, 6" and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens
    assert neighbour.text == "The capital of France is Paris."


def test_a_stream_never_sends_the_stop_string(batched):
    async def pieces() -> list:
        stop = params(GREEDY, max_new_tokens=20, stop=(", 7",))
        return [item async for item in batched.stream_text(BUNDLED_MODEL_ID, COUNTING, stop)]

    *deltas, final = run(pieces())
    assert "".join(deltas) == final.text == " 5, 6"
    assert final.finish_reason == "stop"


def test_a_stop_string_that_never_comes_changes_nothing(batched):
    counting = params(GREEDY, max_new_tokens=12)
    with_stop, without = together(batched, (COUNTING, params(counting, stop=(", 8, 10",))), (COUNTING, counting))
    assert with_stop.text == without.text and with_stop.finish_reason == without.finish_reason == "length"


def test_a_raw_prompt_is_continued_without_the_chat_template(batched):
    text = "The capital of France is"
    completion = together(batched, (Prompt.raw(text), params(GREEDY, max_new_tokens=2)))[0]
    assert completion.text == " Paris."  # the leading space is kept: prompt + text reads on
    assert completion.prompt_tokens == len(batched.loaded(BUNDLED_MODEL_ID).tokenizer(text)["input_ids"])


def test_min_tokens_and_ignore_eos_give_exactly_the_tokens_asked_for_beside_a_plain_row(batched):
    """Greedy, the France answer is 7 text tokens and the end of sequence: both ask for 16."""
    exact = params(GREEDY, max_new_tokens=16)
    at_least, past_eos, plain = together(
        batched, (FRANCE, params(exact, min_new_tokens=16)), (FRANCE, params(exact, ignore_eos=True)), (FRANCE, exact)
    )
    assert plain.text == "The capital of France is Paris." and plain.completion_tokens == 8
    for generation in (at_least, past_eos):
        assert generation.completion_tokens == 16 and generation.finish_reason == "length"
        assert generation.text.startswith("The capital of France is Paris")
    # Without the mask min_tokens' row would have sampled the end of sequence at its 8th token and stopped.
    assert len(past_eos.text) > len(plain.text)
