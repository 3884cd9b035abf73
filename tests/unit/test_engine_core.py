"""The engine core's thread with a fake model runner: requests in, events out, and its failure ladder."""

from __future__ import annotations

import time

import pytest

from engine.core.block_manager import BlockManager
from engine.core.engine_core import EngineCore
from engine.core.scheduler import QueueFull, Scheduler
from engine.core.sequence import FinishEvent, FinishReason, SamplingRequest
from metrics import SchedulerMetrics
from tests.unit.fakes import EOS, RecordingCaller, ScriptedRunner

PROMPT = [10, 11, 12, 13, 14]
WAIT_S = 10


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner({tuple(PROMPT): [5, 6, EOS]})


@pytest.fixture
def core(runner):
    scheduler = Scheduler(
        BlockManager(128), {EOS}, max_batch_size=4, prefill_budget=64, max_queue_size=2,
        metrics=SchedulerMetrics.for_model("unit-test"),
    )  # fmt: skip
    core = EngineCore(scheduler, runner, name="unit-test")
    core.start()
    yield core
    core.stop()


def request(max_new_tokens: int = 10) -> SamplingRequest:
    return SamplingRequest(PROMPT, max_new_tokens, 0.0, deadline=float("inf"))


def test_a_request_gets_its_tokens_then_how_it_ended(core):
    caller = RecordingCaller()
    core.submit(request(), caller.sink)

    assert caller.wait_finish() == FinishEvent(FinishReason.STOP, len(PROMPT), 3, 0)
    assert [event.token_id for event in caller.events[:-1]] == [5, 6]


def test_a_failed_step_fails_its_sequences_and_the_core_serves_on(core, runner):
    runner.fail_with = RuntimeError("step broke")
    failed = RecordingCaller()
    core.submit(request(), failed.sink)
    assert failed.wait_finish() == FinishEvent(FinishReason.ERROR, len(PROMPT), 0, 0, "RuntimeError: step broke")

    runner.fail_with = None
    served = RecordingCaller()
    core.submit(request(), served.sink)
    assert served.wait_finish().reason is FinishReason.STOP
    assert core.failure == ""


def test_a_fatal_error_ends_the_core_and_every_later_request_at_once(core, runner):
    runner.fail_with, runner.fatal = RuntimeError("CUDA error: device-side assert"), True
    first = RecordingCaller()
    core.submit(request(), first.sink)
    assert first.wait_finish().reason is FinishReason.ERROR

    later = RecordingCaller()
    core.submit(request(), later.sink)
    assert later.finished.is_set()  # no thread is left to run it: it ends inside submit
    assert later.events == [FinishEvent(FinishReason.ERROR, len(PROMPT), 0, 0, "RuntimeError: CUDA error: device-side assert")]
    assert core.failure == "RuntimeError: CUDA error: device-side assert"


def test_stopping_ends_what_runs_and_a_request_after_it_at_once(core, runner):
    runner.step_s = 0.01
    long = RecordingCaller()
    core.submit(SamplingRequest([20, 21, 22], 1000, 0.0, deadline=float("inf")), long.sink)
    assert long.started.wait(WAIT_S)  # it runs

    core.stop(FinishReason.UNLOADED)

    assert long.wait_finish().reason is FinishReason.UNLOADED
    late = RecordingCaller()
    core.submit(request(), late.sink)
    assert late.events == [FinishEvent(FinishReason.UNLOADED, len(PROMPT), 0, 0)]  # ended inside submit


def test_a_full_queue_refuses_at_submit(runner):
    scheduler = Scheduler(
        BlockManager(128), {EOS}, max_batch_size=1, prefill_budget=64, max_queue_size=1,
        metrics=SchedulerMetrics.for_model("unit-test"),
    )  # fmt: skip
    core = EngineCore(scheduler, runner, name="unit-test")  # not started: nothing leaves the queue
    core.submit(request(), RecordingCaller().sink)
    with pytest.raises(QueueFull):
        core.submit(request(), RecordingCaller().sink)


def test_a_more_urgent_request_aborts_the_step_in_flight_and_is_served_first(core, runner):
    runner.step_s = 1.0
    bulk = RecordingCaller()
    core.submit(SamplingRequest(PROMPT, 3, 0.0, float("inf"), priority=10), bulk.sink)
    time.sleep(0.2)  # the bulk request's first step is in flight
    urgent = RecordingCaller()

    core.submit(SamplingRequest([20, 21], 1, 0.0, float("inf"), priority=-10), urgent.sink)

    urgent.wait_finish()
    aborted, express, redone = runner.steps[:3]
    assert core.aborted_steps == 1
    assert [chunk.sequence.prompt_ids for chunk in express.prefilling] == [[20, 21]] and express.decoding == []
    assert redone.prefilling == aborted.prefilling  # the bulk prompt, planned again
    assert bulk.wait_finish().reason is FinishReason.STOP and bulk.tokens == [5, 6]


def test_a_request_no_more_urgent_than_the_step_in_flight_waits_for_it(core, runner):
    runner.step_s = 0.3
    first, second = RecordingCaller(), RecordingCaller()
    core.submit(request(3), first.sink)
    time.sleep(0.1)

    core.submit(SamplingRequest([20, 21], 1, 0.0, float("inf")), second.sink)

    second.wait_finish()
    first.wait_finish()
    assert core.aborted_steps == 0


def test_the_step_that_redoes_an_aborted_one_is_not_aborted_again(core, runner):
    runner.step_s = 0.4
    bulk = RecordingCaller()
    core.submit(SamplingRequest(PROMPT, 3, 0.0, float("inf"), priority=10), bulk.sink)
    time.sleep(0.1)
    first_urgent, second_urgent = RecordingCaller(), RecordingCaller()
    core.submit(SamplingRequest([20, 21], 1, 0.0, float("inf"), priority=-10), first_urgent.sink)
    first_urgent.wait_finish()
    time.sleep(0.1)  # the redo of the bulk step is in flight

    core.submit(SamplingRequest([30, 31], 1, 0.0, float("inf"), priority=-10), second_urgent.sink)

    second_urgent.wait_finish()
    assert core.aborted_steps == 1
    aborted, express, redone, second_express = runner.steps[:4]
    assert redone.prefilling == aborted.prefilling
    assert [chunk.sequence.prompt_ids for chunk in second_express.prefilling] == [[30, 31]]


def test_calibration_runs_steps_of_one_row_and_of_a_full_batch_before_the_first_request(runner):
    scheduler = Scheduler(BlockManager(128), {EOS}, 6, 64, 8, metrics=SchedulerMetrics.for_model("unit-test"))
    core = EngineCore(scheduler, runner, name="unit-test")
    core.start()
    try:
        core.calibrate()
    finally:
        core.stop()
    decode_rows = [len(step.decoding) for step in runner.steps if step.decoding and not step.prefilling]
    assert decode_rows == [1, 1, 1, 6, 6, 6] * 2  # each request's first token comes with its prompt
    assert scheduler.rate.known and not scheduler.has_work
