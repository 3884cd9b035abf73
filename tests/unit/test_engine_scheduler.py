"""The scheduler's decisions, driven step by step with a fake model runner (no torch, no thread)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.core.block_manager import BLOCK_SIZE, BlockManager, block_hashes
from engine.core.scheduler import QueueFull, ScheduledStep, Scheduler, StepOutput
from engine.core.sequence import (
    BlockCopy,
    FinishEvent,
    FinishReason,
    SamplingRequest,
    ScoredPosition,
    ScoreEvent,
    Sequence,
    TokenLogprobs,
)
from metrics import SchedulerMetrics
from tests.unit.fakes import EOS, RecordingCaller, ScriptedRunner

FAR = 1e9  # a deadline that never comes
NOW = 100.0


def scheduler(num_blocks: int = 64, max_batch_size: int = 8, prefill_budget: int = 512, max_queue_size: int = 16) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks),
        {EOS},
        max_batch_size=max_batch_size,
        prefill_budget=prefill_budget,
        max_queue_size=max_queue_size,
        metrics=SchedulerMetrics.for_model("unit-test"),
    )


def submit(
    into: Scheduler,
    prompt: list[int],
    max_new_tokens: int = 4,
    deadline: float = FAR,
    priority: int = 0,
    scored: tuple[ScoredPosition, ...] = (),
) -> tuple[Sequence, RecordingCaller]:
    caller = RecordingCaller()
    request = SamplingRequest(prompt, max_new_tokens, 0.0, deadline, priority=priority, scored=scored)
    sequence = Sequence(request, caller.sink, block_hashes(prompt))
    into.add(sequence, NOW)
    return sequence, caller


def step(into: Scheduler, runner: ScriptedRunner, now: float = NOW) -> ScheduledStep | None:
    scheduled = into.schedule(now)
    if scheduled is not None:
        into.update(scheduled, runner.execute(scheduled), now)
    return scheduled


def run_until_idle(into: Scheduler, runner: ScriptedRunner, limit: int = 200) -> int:
    for count in range(limit):
        if step(into, runner) is None:
            return count
    raise AssertionError("the scheduler never went idle")


def prompt_of(length: int, first: int = 1000) -> list[int]:
    return list(range(first, first + length))


def test_a_request_prefills_then_decodes_one_token_a_step_until_its_length():
    runner = ScriptedRunner({tuple(prompt_of(5)): [5, 6, 7]})
    into = scheduler()
    sequence, caller = submit(into, prompt_of(5), max_new_tokens=3)

    assert run_until_idle(into, runner) == 3
    assert caller.tokens == [5, 6, 7]
    assert caller.finish == FinishEvent(FinishReason.LENGTH, 5, 3, 0)
    first, second, third = runner.steps
    assert [(c.start, c.end) for c in first.prefilling] == [(0, 5)] and first.decoding == []
    assert second.decoding == [sequence] and second.prefilling == []
    assert into.blocks.available == into.blocks.usable  # every block given back


def test_an_end_of_sequence_token_ends_it_with_stop_and_is_not_sent():
    runner = ScriptedRunner({tuple(prompt_of(5)): [5, EOS, 7]})
    into = scheduler()
    _, caller = submit(into, prompt_of(5), max_new_tokens=10)

    run_until_idle(into, runner)

    assert caller.tokens == [5]
    assert caller.finish.reason is FinishReason.STOP and caller.finish.completion_tokens == 2


def test_with_ignore_eos_an_end_of_sequence_token_is_sent_and_generation_goes_on_to_its_length():
    runner = ScriptedRunner({tuple(prompt_of(5)): [5, EOS, 7]})
    into = scheduler()
    caller = RecordingCaller()
    request = SamplingRequest(prompt_of(5), 4, 0.0, FAR, ignore_eos=True)
    into.add(Sequence(request, caller.sink, block_hashes(request.prompt_ids)), NOW)

    run_until_idle(into, runner)

    assert caller.tokens == [5, EOS, 7, ScriptedRunner.FILLER]
    assert caller.finish.reason is FinishReason.LENGTH and caller.finish.completion_tokens == 4


def test_requests_are_admitted_oldest_first_while_the_batch_has_room():
    runner = ScriptedRunner()
    into = scheduler(max_batch_size=2)
    sequences = [submit(into, prompt_of(5, first=1000 * n), max_new_tokens=2)[0] for n in range(1, 4)]

    first = step(into, runner)

    assert [chunk.sequence for chunk in first.prefilling] == sequences[:2]
    assert list(into.waiting) == sequences[2:]
    step(into, runner)  # the first two get their second and last token, and leave
    third = step(into, runner)
    assert [chunk.sequence for chunk in third.prefilling] == sequences[2:]


def test_a_step_prefills_at_most_the_budget_shortest_remaining_prompt_first():
    runner = ScriptedRunner()
    into = scheduler(prefill_budget=8)
    long, _ = submit(into, prompt_of(20, first=1000))
    short, _ = submit(into, prompt_of(5, first=2000))

    first = step(into, runner)

    assert [(c.sequence, c.start, c.end) for c in first.prefilling] == [(short, 0, 5), (long, 0, 3)]
    assert first.sampled == [short]  # only a completed prompt gives a token
    second = step(into, runner)
    assert second.decoding == [short]
    assert [(c.sequence, c.start, c.end) for c in second.prefilling] == [(long, 3, 11)]
    assert all(sum(c.end - c.start for c in s.prefilling) <= 8 for s in runner.steps)


def test_a_cancelled_request_leaves_at_the_next_step_and_gives_its_blocks_back():
    runner = ScriptedRunner()
    into = scheduler()
    running, running_caller = submit(into, prompt_of(5), max_new_tokens=50)
    step(into, runner)
    waiting, waiting_caller = submit(into, prompt_of(5, first=3000), max_new_tokens=50)
    running.cancel()
    waiting.cancel()

    assert step(into, runner) is None

    assert running_caller.finish.reason is FinishReason.CANCELLED
    assert waiting_caller.finish.reason is FinishReason.CANCELLED and waiting_caller.tokens == []
    assert into.blocks.available == into.blocks.usable


def test_a_request_past_its_deadline_ends_with_timeout_waiting_or_running():
    runner = ScriptedRunner()
    into = scheduler(max_batch_size=1)
    _, running = submit(into, prompt_of(5), max_new_tokens=50, deadline=NOW + 1)
    _, queued = submit(into, prompt_of(5, first=3000), max_new_tokens=50, deadline=NOW + 1)
    step(into, runner)

    assert step(into, runner, now=NOW + 1) is None

    assert running.finish.reason is FinishReason.TIMEOUT and running.tokens
    assert queued.finish.reason is FinishReason.TIMEOUT and queued.tokens == []
    assert into.blocks.available == into.blocks.usable


def test_the_queue_holds_at_most_max_queue_size():
    into = scheduler(max_queue_size=2)
    submit(into, prompt_of(5))
    submit(into, prompt_of(5))
    assert into.queue_full
    with pytest.raises(QueueFull):
        submit(into, prompt_of(5))


def test_a_request_waits_while_the_cache_is_full_then_runs():
    runner = ScriptedRunner()
    into = scheduler(num_blocks=3)  # 2 usable blocks: one request of up to 32 tokens at a time
    _, first = submit(into, prompt_of(20), max_new_tokens=4)
    _, second = submit(into, prompt_of(20, first=5000), max_new_tokens=4)

    step(into, runner)
    assert into.load["running"] == 1 and into.load["waiting"] == 1

    run_until_idle(into, runner)
    assert first.finish.reason is second.finish.reason is FinishReason.LENGTH


def test_a_shared_prefix_is_reused_and_a_partly_shared_block_is_copied_before_its_first_chunk():
    runner = ScriptedRunner()
    into = scheduler()
    shared = prompt_of(BLOCK_SIZE + 5)
    submit(into, shared + prompt_of(20, first=2000), max_new_tokens=1)
    run_until_idle(into, runner)

    later, caller = submit(into, shared + prompt_of(20, first=3000), max_new_tokens=2)
    first = step(into, runner)

    assert later.cached_prompt_tokens == BLOCK_SIZE + 5
    assert [(c.start, c.end) for c in first.prefilling] == [(BLOCK_SIZE + 5, later.prompt_length)]
    (copy,) = first.copies
    assert copy.target == later.blocks[1] and copy.tokens == 5
    assert into.blocks.references[copy.source] == 0  # released once the step made the copy
    run_until_idle(into, runner)
    assert caller.finish.cached_prompt_tokens == BLOCK_SIZE + 5


def test_the_runner_hears_which_sequences_ended_since_the_last_step():
    runner = ScriptedRunner()
    into = scheduler()
    quick, _ = submit(into, prompt_of(5), max_new_tokens=1)
    slow, _ = submit(into, prompt_of(5, first=2000), max_new_tokens=3)
    step(into, runner)  # `quick` ends with its first token

    assert step(into, runner).finished_ids == [quick.seq_id]
    run_until_idle(into, runner)
    submit(into, prompt_of(5, first=3000))
    assert step(into, runner).finished_ids == [slow.seq_id]  # the next step, whenever it comes


def test_a_failed_step_ends_the_running_sequences_with_an_error_and_frees_them():
    into = scheduler()
    _, caller = submit(into, prompt_of(5), max_new_tokens=5)
    into.schedule(NOW)

    into.fail_running("RuntimeError: boom")

    assert caller.finish == FinishEvent(FinishReason.ERROR, 5, 0, 0, "RuntimeError: boom")
    assert into.blocks.available == into.blocks.usable and not into.has_work


def test_finishing_all_ends_waiting_and_running_alike():
    into = scheduler(max_batch_size=1)
    _, running = submit(into, prompt_of(5))
    _, waiting = submit(into, prompt_of(5, first=3000))
    into.schedule(NOW)

    into.finish_all(FinishReason.UNLOADED)

    assert running.finish.reason is waiting.finish.reason is FinishReason.UNLOADED
    assert not into.has_work and into.blocks.available == into.blocks.usable


def test_a_copy_whose_sequence_never_ran_is_let_go_with_it():
    runner = ScriptedRunner()
    into = scheduler()
    shared = prompt_of(BLOCK_SIZE + 5)
    submit(into, shared + [7] * 20, max_new_tokens=1)
    run_until_idle(into, runner)
    later, _ = submit(into, shared + [8] * 20, max_new_tokens=1)
    into.schedule(NOW)
    assert isinstance(later.pending_copy, BlockCopy)

    later.cancel()
    into.schedule(NOW)

    assert sum(into.blocks.references) == 0


def test_higher_priority_is_admitted_first_and_equal_priorities_keep_their_order():
    runner = ScriptedRunner()
    into = scheduler(max_batch_size=1)
    running, _ = submit(into, prompt_of(5), max_new_tokens=2)
    step(into, runner)
    bulk_first, _ = submit(into, prompt_of(5, 2000), priority=10)
    bulk_second, _ = submit(into, prompt_of(5, 3000), priority=10)
    normal, _ = submit(into, prompt_of(5, 4000))
    interactive, _ = submit(into, prompt_of(5, 5000), priority=-10)

    assert list(into.waiting) == [interactive, normal, bulk_first, bulk_second]
    admitted = []
    while into.has_work:
        scheduled = step(into, runner)
        admitted += [chunk.sequence for chunk in scheduled.prefilling if chunk.start == 0]
    assert admitted == [interactive, normal, bulk_first, bulk_second]


def test_a_step_that_computes_a_more_urgent_prompt_leaves_less_urgent_decoders_for_the_next():
    runner = ScriptedRunner()
    into = scheduler()
    bulk, _ = submit(into, prompt_of(5), max_new_tokens=10, priority=10)
    step(into, runner)
    normal, _ = submit(into, prompt_of(5, 2000), max_new_tokens=10)
    normal_prompt = step(into, runner)
    interactive, _ = submit(into, prompt_of(5, 3000), max_new_tokens=10, priority=-10)

    interactive_prompt = step(into, runner)
    after = step(into, runner)

    assert normal_prompt.decoding == [] and [chunk.sequence for chunk in normal_prompt.prefilling] == [normal]
    assert interactive_prompt.decoding == [] and [chunk.sequence for chunk in interactive_prompt.prefilling] == [interactive]
    assert after.decoding == [bulk, normal, interactive] and after.prefilling == []


def test_while_a_more_urgent_prompt_prefills_less_urgent_prompts_wait():
    into = scheduler(prefill_budget=16)
    normal, _ = submit(into, prompt_of(6))
    batch, _ = submit(into, prompt_of(4, 2000), priority=10)
    interactive, _ = submit(into, prompt_of(7, 3000), priority=-10)
    other_interactive, _ = submit(into, prompt_of(3, 4000), priority=-10)

    first = into.schedule(NOW)
    into.update(first, ScriptedRunner().execute(first), NOW)
    second = into.schedule(NOW)

    assert [(c.sequence, c.end) for c in first.prefilling] == [(other_interactive, 3), (interactive, 7)]
    assert [(c.sequence, c.end) for c in second.prefilling] == [(normal, 6)]


def test_a_more_urgent_request_joins_a_full_batch_within_its_headroom():
    into = scheduler(max_batch_size=4)
    for first in range(4):
        submit(into, prompt_of(5, 1000 * (first + 1)), max_new_tokens=50, priority=10)
    step(into, ScriptedRunner())
    normal, _ = submit(into, prompt_of(5, 6000), priority=10)
    interactive, _ = submit(into, prompt_of(5, 7000), priority=-10)
    second_interactive, _ = submit(into, prompt_of(5, 8000), priority=-10)

    step(into, ScriptedRunner())

    assert into.priority_headroom == 1 and len(into.running) == 5
    assert interactive in into.running and list(into.waiting) == [second_interactive, normal]


def test_a_full_queue_drops_its_newest_lowest_priority_request_for_a_higher_one():
    into = scheduler(max_batch_size=1, max_queue_size=3)
    submit(into, prompt_of(5))
    step(into, ScriptedRunner())
    old_bulk, old_bulk_caller = submit(into, prompt_of(5, 2000), priority=10)
    new_bulk, new_bulk_caller = submit(into, prompt_of(5, 3000), priority=10)
    normal, _ = submit(into, prompt_of(5, 4000))

    with pytest.raises(QueueFull):  # no lower priority waits: refused like any request to a full queue
        submit(into, prompt_of(5, 5000), priority=10)
    interactive, _ = submit(into, prompt_of(5, 6000), priority=-10)

    assert list(into.waiting) == [interactive, normal, old_bulk]
    assert new_bulk_caller.finish.reason is FinishReason.REFUSED
    assert "priority -10" in new_bulk_caller.finish.detail
    assert old_bulk_caller.finish is None
    assert into.refuses(10) and not into.refuses(0)


def test_a_scoring_request_answers_from_its_prompt_logits_and_generates_nothing():
    runner = ScriptedRunner()
    into = scheduler(prefill_budget=8)
    prompt = prompt_of(12)
    scored = (ScoredPosition(3, (7, 9)), ScoredPosition(11, (5,)))
    sequence, caller = submit(into, prompt, max_new_tokens=0, scored=scored)

    assert run_until_idle(into, runner) == 2  # the prompt in two chunks, each scoring its own position
    assert [chunk.scored_positions for chunk in runner.steps[0].scored] == [[3]]
    assert [chunk.scored_positions for chunk in runner.steps[1].scored] == [[11]]
    assert all(step.sampled == [] for step in runner.steps)
    assert caller.events[0] == ScoreEvent((runner.score(3, (7, 9)), runner.score(11, (5,))))
    assert caller.finish == FinishEvent(FinishReason.STOP, 12, 0, 0)
    assert caller.tokens == [] and into.blocks.available == into.blocks.usable


def test_a_scoring_request_computes_its_scored_positions_even_when_the_prefix_cache_holds_them():
    runner = ScriptedRunner()
    into = scheduler()
    prompt = prompt_of(3 * BLOCK_SIZE)
    submit(into, prompt, max_new_tokens=1)
    run_until_idle(into, runner)  # its prompt's blocks are cached now
    position = BLOCK_SIZE + 2
    sequence, caller = submit(into, prompt, max_new_tokens=0, scored=(ScoredPosition(position, (1,)),))

    run_until_idle(into, runner)

    assert sequence.cached_prompt_tokens == position  # the cache stands in only before the scored position
    assert caller.events[0] == ScoreEvent((runner.score(position, (1,)),))


def test_a_row_whose_grammar_refuses_its_token_ends_alone_as_unwritable():
    class GrammarRefusing(ScriptedRunner):
        def execute(self, step: ScheduledStep) -> StepOutput:
            output = super().execute(step)
            return replace(output, failed={step.sampled[0].seq_id: "the grammar refused token 1"})

    into = scheduler()
    _, refused = submit(into, prompt_of(5))
    _, other = submit(into, prompt_of(5, 2000), max_new_tokens=1)

    step(into, GrammarRefusing())

    assert refused.finish == FinishEvent(FinishReason.UNWRITABLE, 5, 0, 0, "the grammar refused token 1")
    assert other.finish.reason is FinishReason.LENGTH and other.tokens == [ScriptedRunner.FILLER]


def test_an_end_of_sequence_token_is_sent_with_its_logprobs_to_a_request_that_asked_for_them():
    class Scoring(ScriptedRunner):
        def execute(self, step: ScheduledStep) -> StepOutput:
            output = super().execute(step)
            return replace(output, logprobs=[TokenLogprobs(-0.5) for _ in step.sampled])

    into = scheduler()
    caller = RecordingCaller()
    request = SamplingRequest(prompt_of(5), 10, 0.0, FAR, logprobs=0)
    into.add(Sequence(request, caller.sink, block_hashes(prompt_of(5))), NOW)

    run_until_idle(into, Scoring({tuple(prompt_of(5)): [5, EOS]}))

    assert caller.tokens == [5, EOS] and caller.finish == FinishEvent(FinishReason.STOP, 5, 2, 0)


def test_background_prompts_are_computed_a_quarter_budget_a_step():
    into = scheduler(prefill_budget=64)
    batch, _ = submit(into, prompt_of(40), priority=10)

    first = into.schedule(NOW)
    into.update(first, ScriptedRunner().execute(first), NOW)
    normal, _ = submit(into, prompt_of(40, 2000))
    second = into.schedule(NOW)

    assert into.background_prefill_budget == 16
    assert [(chunk.start, chunk.end) for chunk in first.prefilling] == [(0, 16)]
    assert [(chunk.sequence, chunk.end) for chunk in second.prefilling] == [(normal, 40)]  # the full budget
