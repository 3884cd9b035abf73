"""The batch scheduler on the real bundled model: batched outputs match lone ones, prefixes are
reused without changing outputs, and cancelled or timed-out requests leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from domain import (
    Generation,
    GenerationParams,
    GenerationTimeoutError,
    InvalidRequestError,
    ModelUnloadingError,
    OverloadedError,
    PromptBuilder,
)
from engine.core.block_manager import BLOCK_SIZE
from engine.core.sequence import FinishReason, SamplingRequest
from engine.models.loader import BatchingOptions
from engine.repository import TransformersModelRepository

from .support import BUNDLED_MODEL_ID, QUANTIZATIONS, ROOMY, DirectoryCatalog

QUESTIONS = [
    ("What is the capital of France? Answer in one sentence.", []),
    ("Is this post extremist content? Answer yes or no.", ["Post: Join our bake sale on Sunday, everyone is welcome!"]),
    ("Is this post extremist content? Answer yes or no.", ["Post: They will pay for this, join us and fight them."]),
    ("Classify the sentiment of this review as positive or negative.", ["Review: The food was cold and the waiter rude."]),
    ("What is the name of the cat? Answer with the name only.", ["The cat in this story is called Oliver."]),
    ("Does this message contain a threat? Answer yes or no.", ["Message: I will find you and you will regret it."]),
    ("Name three colours.", []),
    ("Translate 'good morning' into French.", []),
]
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, timeout_s=120)
PROMPTS = [PromptBuilder().build(query, context) for query, context in QUESTIONS]
both_quantizations = pytest.mark.parametrize("batched", QUANTIZATIONS, indirect=True)


def run(coroutine):
    return asyncio.run(coroutine)


def engine(executor, quantization: str = "none", **batching) -> TransformersModelRepository:
    options = BatchingOptions(**batching)
    repository = TransformersModelRepository(
        DirectoryCatalog({}), executor, ROOMY, batching=options, quantization_setting=quantization
    )
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    return repository


@pytest.fixture(scope="module")
def module_executor():
    with ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture(scope="module")
def batched(request, module_executor):
    """Unquantized, unless a test parametrizes it indirectly with a QUANTIZATION value."""
    repository = engine(module_executor, getattr(request, "param", "none"), max_batch_size=32, prefill_budget=128)
    yield repository
    run(repository.unload_model(BUNDLED_MODEL_ID))


def tokens_of(repository, prompt) -> list[int]:
    return repository.loaded(BUNDLED_MODEL_ID).encode(prompt)


def scheduler_of(repository):
    return repository.loaded(BUNDLED_MODEL_ID).core.scheduler


async def wait_idle(repository, timeout_s: float = 5.0) -> float:
    """Seconds until the scheduler has no sequence left, running or waiting."""
    started = time.monotonic()
    while scheduler_of(repository).load["running"] or scheduler_of(repository).load["waiting"]:
        assert time.monotonic() - started < timeout_s, scheduler_of(repository).load
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_greedy_outputs_in_a_batch_match_outputs_alone(batched, module_executor):
    alone = engine(module_executor, max_batch_size=1)
    try:
        lone = [run(alone.generate_text(BUNDLED_MODEL_ID, prompt, GREEDY)).text for prompt in PROMPTS]
    finally:
        run(alone.unload_model(BUNDLED_MODEL_ID))

    async def all_at_once() -> list[Generation]:
        return await asyncio.gather(*(batched.generate_text(BUNDLED_MODEL_ID, p, GREEDY) for p in PROMPTS * 3))

    together = [generation.text for generation in run(all_at_once())]
    assert together == lone * 3
    assert "Paris" in lone[0] and "Oliver" in lone[4]


def test_shared_prefixes_are_reused_without_changing_outputs(batched, module_executor):
    # A post no other test sends, after the instruction of PROMPTS[1] and PROMPTS[2].
    prompt = PromptBuilder().build(QUESTIONS[1][0], ["Post: Lovely weather for the harbour festival today."])
    fresh = engine(module_executor)  # an empty prefix cache
    try:
        cold = run(fresh.generate_text(BUNDLED_MODEL_ID, prompt, GREEDY))
    finally:
        run(fresh.unload_model(BUNDLED_MODEL_ID))
    run(batched.generate_text(BUNDLED_MODEL_ID, PROMPTS[2], GREEDY))  # same system prompt and instruction
    warm = run(batched.generate_text(BUNDLED_MODEL_ID, prompt, GREEDY))
    assert cold.cached_prompt_tokens == 0
    # The shared part (system prompt, instruction, "Context:\n[1] Post:") ends inside a block: whole
    # blocks are shared, and the rest of the shared tokens are copied.
    shared = len(os.path.commonprefix([tokens_of(batched, prompt), tokens_of(batched, PROMPTS[2])]))
    assert shared % BLOCK_SIZE and warm.cached_prompt_tokens == shared
    assert warm.text == cold.text


@both_quantizations
def test_rows_with_their_own_temperature_and_length_share_a_batch(batched):
    params = [
        GenerationParams(max_new_tokens=3, temperature=0.0, timeout_s=120),
        GenerationParams(max_new_tokens=12, temperature=0.9, timeout_s=120),
        GenerationParams(max_new_tokens=12, temperature=0.0, timeout_s=120),
        GenerationParams(max_new_tokens=5, temperature=1.5, timeout_s=120),
    ]

    async def mixed() -> list[Generation]:
        return await asyncio.gather(*(batched.generate_text(BUNDLED_MODEL_ID, PROMPTS[0], p) for p in params))

    short, sampled, greedy, hot = run(mixed())
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    assert hot.completion_tokens <= 5
    assert greedy.text == "The capital of France is Paris."
    assert sampled.text and sampled.temperature == 0.9


@both_quantizations
def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_short_requests(batched):
    long_prompt = PromptBuilder().build("Summarise this text in one sentence.", ["The sky is blue today. " * 250])

    async def long_then_short() -> tuple[float, float]:
        finished: dict[str, float] = {}

        async def timed(name: str, prompt, params) -> None:
            await batched.generate_text(BUNDLED_MODEL_ID, prompt, params)
            finished[name] = time.monotonic()

        long = asyncio.create_task(timed("long", long_prompt, GenerationParams(4, 0.0, 120)))
        await asyncio.sleep(0.05)
        await timed("short", PROMPTS[0], GREEDY)
        await long
        return finished["short"], finished["long"]

    steps_before = scheduler_of(batched).steps
    short_done, long_done = run(long_then_short())
    assert short_done < long_done  # the short request did not wait for the 1,500-token prefill
    assert scheduler_of(batched).steps - steps_before > 1500 // 128  # the long prompt took many steps


@both_quantizations
def test_a_cancelled_stream_leaves_the_batch_at_once(batched):
    blocks = scheduler_of(batched).load["free_kv_blocks"]

    async def read_two_pieces_then_leave() -> float:
        stream = batched.stream_text(BUNDLED_MODEL_ID, PromptBuilder().build("Tell a long story.", []), GenerationParams(400, 0.0, 120))
        pieces = 0
        async for item in stream:
            pieces += 1
            if pieces == 2:
                break
        await stream.aclose()
        assert scheduler_of(batched).load["running"] == 1  # still there until the next step
        return await wait_idle(batched)

    assert run(read_two_pieces_then_leave()) < 1.0
    assert scheduler_of(batched).load["free_kv_blocks"] == blocks


@both_quantizations
def test_a_request_past_its_deadline_stops_and_frees_its_slot(batched):
    blocks = scheduler_of(batched).load["free_kv_blocks"]
    with pytest.raises(GenerationTimeoutError, match="MAX_GENERATION_TIME=0.3s"):
        run(batched.generate_text(BUNDLED_MODEL_ID, PromptBuilder().build("Tell a long story.", []), GenerationParams(400, 0.0, 0.3)))
    assert scheduler_of(batched).load["running"] == 0
    assert scheduler_of(batched).load["free_kv_blocks"] == blocks


def test_a_request_larger_than_the_kv_cache_is_refused(module_executor):
    tiny_cache = engine(module_executor, kv_cache_bytes=4 * 16 * 46080)  # 3 usable blocks of 16 tokens
    try:
        with pytest.raises(InvalidRequestError, match="tokens of KV cache"):
            run(tiny_cache.generate_text(BUNDLED_MODEL_ID, PROMPTS[0], GREEDY))
    finally:
        run(tiny_cache.unload_model(BUNDLED_MODEL_ID))


def test_unloading_ends_running_generations_with_model_unloading(module_executor):
    repository = engine(module_executor)

    async def generate_then_unload() -> None:
        story = asyncio.create_task(
            repository.generate_text(BUNDLED_MODEL_ID, PromptBuilder().build("Tell a long story.", []), GenerationParams(400, 0.0, 120))
        )
        await asyncio.sleep(0.5)
        await repository.unload_model(BUNDLED_MODEL_ID)
        await story

    with pytest.raises(ModelUnloadingError, match="unloaded before this generation finished"):
        run(generate_then_unload())


def test_with_a_batch_size_of_one_sequences_run_one_at_a_time(module_executor):
    repository = engine(module_executor, max_batch_size=1)
    seen_running = []

    async def four_at_once() -> None:
        tasks = [asyncio.create_task(repository.generate_text(BUNDLED_MODEL_ID, p, GREEDY)) for p in PROMPTS[:4]]
        while not all(task.done() for task in tasks):
            seen_running.append(scheduler_of(repository).load["running"])
            await asyncio.sleep(0.01)

    try:
        run(four_at_once())
    finally:
        run(repository.unload_model(BUNDLED_MODEL_ID))
    assert max(seen_running) == 1


def test_a_request_the_queue_would_push_past_its_deadline_is_refused_on_arrival(module_executor):
    """Once the engine has measured its rate, a request that would wait behind a long one past its
    deadline is refused at once (429, with when to retry), instead of queueing to fail at its
    deadline. (The scheduler's unit tests cover a deadline passing while queued.)"""
    repository = engine(module_executor, max_batch_size=1)
    story = PromptBuilder().build("Tell a long story.", [])

    async def queued_behind_a_long_one() -> None:
        exactly_120 = GenerationParams(120, 0.0, 120, min_new_tokens=120)
        long = asyncio.create_task(repository.generate_text(BUNDLED_MODEL_ID, story, exactly_120))
        scheduler = scheduler_of(repository)  # its rate is known from the load's calibration
        while not any(sequence.output_ids for sequence in scheduler.running):  # the long one decodes
            await asyncio.sleep(0.01)
        try:  # alone it would take about 0.3 s here; behind the long one's ~120 steps, over 3 s
            await repository.generate_text(BUNDLED_MODEL_ID, PROMPTS[0], GenerationParams(10, 0.0, 2.0))
        finally:
            long.cancel()

    try:
        with pytest.raises(OverloadedError, match=r"would take about [\d.]+s, past MAX_GENERATION_TIME") as refused:
            run(queued_behind_a_long_one())
        assert refused.value.retry_after_s > 0
        assert scheduler_of(repository).load["waiting"] == 0
    finally:
        run(repository.unload_model(BUNDLED_MODEL_ID))


@pytest.mark.parametrize("temperature", [5e-324, 1e-8, 1e-4])
def test_a_vanishing_temperature_is_greedy_and_never_breaks_the_batch(batched, temperature):
    tiny = GenerationParams(max_new_tokens=12, temperature=temperature, timeout_s=120)

    async def with_a_neighbour() -> list[Generation]:
        return await asyncio.gather(
            batched.generate_text(BUNDLED_MODEL_ID, PROMPTS[0], tiny),
            batched.generate_text(BUNDLED_MODEL_ID, PROMPTS[0], GREEDY),
        )

    odd, neighbour = run(with_a_neighbour())
    assert odd.text == neighbour.text == "The capital of France is Paris."


def test_a_request_that_races_an_unload_ends_with_model_unloading_not_a_hang(module_executor):
    repository = engine(module_executor)
    loaded = repository.loaded(BUNDLED_MODEL_ID)
    run(repository.unload_model(BUNDLED_MODEL_ID))  # the engine core is stopped; `loaded` is stale
    finished = []
    loaded.core.submit(SamplingRequest([1, 2, 3], 4, 0.0, time.monotonic() + 5), finished.append)
    assert [event.reason for event in finished] == [FinishReason.UNLOADED]
