"""Admission by expected finish: the service rate learned from steps, the estimate of a request's
finish behind the batch and the queue, and the scheduler shedding what would miss its deadline."""

from __future__ import annotations

import pytest

from engine.core import service_rate
from engine.core.service_rate import Backlog, PastDeadline, ServiceRate, Work, check_deadline
from tests.unit.fakes import ScriptedRunner
from tests.unit.test_engine_scheduler import NOW, prompt_of, scheduler, step, submit

PROMPT_TOKEN_S = 0.001
DECODE_STEP_S = 0.05


@pytest.fixture(autouse=True)
def whole_deadline(monkeypatch):
    """The estimates here are checked against the whole deadline; the planned share has its own test."""
    monkeypatch.setattr(service_rate, "PLANNED_SHARE_OF_DEADLINE", 1.0)


def taught(rate: ServiceRate) -> ServiceRate:
    rate.observe(prompt_tokens=0, decode_rows=8, seconds=DECODE_STEP_S)
    rate.observe(prompt_tokens=100, decode_rows=8, seconds=DECODE_STEP_S + 100 * PROMPT_TOKEN_S)
    return rate


def test_nothing_is_estimated_until_both_rates_are_measured():
    rate = ServiceRate()
    assert rate.finish_in([], [], Work(10, 5), batch_size=4) is None
    rate.observe(prompt_tokens=0, decode_rows=1, seconds=0.05)
    assert rate.finish_in([], [], Work(10, 5), batch_size=4) is None


def test_the_prompt_rate_is_what_prompt_tokens_add_to_a_step():
    rate = taught(ServiceRate())
    assert rate.decode_step_s == pytest.approx(DECODE_STEP_S)
    assert rate.prompt_token_s == pytest.approx(PROMPT_TOKEN_S)
    # A step of prompt alone costs the step's own D too: it is not the prompt's.
    rate.observe(prompt_tokens=100, decode_rows=0, seconds=DECODE_STEP_S + 100 * PROMPT_TOKEN_S)
    assert rate.prompt_token_s == pytest.approx(PROMPT_TOKEN_S)


def test_a_small_prompt_chunk_weighs_by_its_size():
    rate = taught(ServiceRate())
    rate.observe(prompt_tokens=4, decode_rows=8, seconds=2 * DECODE_STEP_S)  # a noisy step: 12.5 ms a token
    assert rate.prompt_token_s == pytest.approx((100 * PROMPT_TOKEN_S + DECODE_STEP_S) / 104)


def test_the_rate_is_the_mean_of_the_last_seconds_of_steps_an_outlier_counting_once():
    rate = ServiceRate()
    for second in range(10):
        rate.observe(prompt_tokens=0, decode_rows=8, seconds=DECODE_STEP_S, at=float(second))
    rate.observe(prompt_tokens=0, decode_rows=8, seconds=40 * DECODE_STEP_S, at=10.0)  # descheduled for 2 s
    # The window is 5 s, but holds the last 8 steps at least: seven of 50 ms, and the outlier.
    assert rate.decode_step_s == pytest.approx((7 * DECODE_STEP_S + 40 * DECODE_STEP_S) / 8)
    for index in range(20):  # a machine now twice as slow, for 2 s: only its steps are in the window
        rate.observe(prompt_tokens=0, decode_rows=8, seconds=2 * DECODE_STEP_S, at=20.0 + index / 10)
    assert rate.decode_step_s == pytest.approx(2 * DECODE_STEP_S)


def test_a_step_costs_by_its_rows_as_calibrated_and_the_level_follows_the_machine():
    rate = ServiceRate()
    for index in range(4):  # a row adds a tenth of a one-row step
        rate.observe(prompt_tokens=0, decode_rows=1, seconds=DECODE_STEP_S, at=index / 10)
        rate.observe(prompt_tokens=0, decode_rows=31, seconds=4 * DECODE_STEP_S, at=index / 10)
    rate.calibrate_rows(31)
    assert rate.row_cost == pytest.approx(0.1)
    assert rate.step_s(1) == pytest.approx(DECODE_STEP_S) and rate.step_s(31) == pytest.approx(4 * DECODE_STEP_S)
    for index in range(8):  # another process takes half the cores: every step now takes twice as long
        rate.observe(prompt_tokens=0, decode_rows=31, seconds=8 * DECODE_STEP_S, at=10 + index / 10)
    assert rate.step_s(31) == pytest.approx(8 * DECODE_STEP_S)
    assert rate.step_s(1) == pytest.approx(2 * DECODE_STEP_S)


def test_a_request_behind_a_busy_batch_is_costed_at_the_rows_it_runs_with():
    rate = ServiceRate.of(PROMPT_TOKEN_S, DECODE_STEP_S, row_cost=0.5)
    # Behind three sequences in a batch of four, it decodes among four rows: 2.5 one-row steps each.
    expected = rate.finish_in([Work(0, 2), Work(0, 2), Work(0, 2)], [], Work(0, 4), batch_size=4)
    assert expected == pytest.approx(4 * 2.5 * DECODE_STEP_S)


def test_admission_plans_for_its_share_of_the_deadline(monkeypatch):
    monkeypatch.setattr(service_rate, "PLANNED_SHARE_OF_DEADLINE", 0.8)
    rate = ServiceRate.of(PROMPT_TOKEN_S, DECODE_STEP_S, row_cost=0.0)
    behind = Backlog.of(1, [Work(0, 10)])  # 10 steps ahead, 10 of its own: 1 s
    check_deadline(behind, Work(0, 10), rate, allowed_s=1.25)
    with pytest.raises(PastDeadline):
        check_deadline(behind, Work(0, 10), rate, allowed_s=1.2)


def test_with_free_slots_a_request_finishes_after_the_prompts_and_its_own_decode_steps():
    rate = taught(ServiceRate())
    expected = rate.finish_in([Work(0, 9)], [Work(50, 4)], Work(30, 5), batch_size=4)
    assert expected == pytest.approx((50 + 30) * PROMPT_TOKEN_S + 5 * DECODE_STEP_S)


def test_with_a_full_batch_a_request_waits_for_the_first_slot_that_frees():
    rate = taught(ServiceRate())
    # Two slots: sequences with 3 and 8 steps left run; the one queued ahead takes the slot freed at
    # step 3 until step 3 + 4 = 7; the new one gets the slot freed at 7.
    expected = rate.finish_in([Work(0, 3), Work(0, 8)], [Work(0, 4)], Work(0, 5), batch_size=2)
    assert expected == pytest.approx((7 + 5) * DECODE_STEP_S)


def test_a_request_that_would_miss_its_deadline_is_shed_and_the_queue_is_unchanged():
    into = scheduler(max_batch_size=2)
    taught(into.rate)
    submit(into, prompt_of(40), max_new_tokens=100)
    submit(into, prompt_of(40, 5000), max_new_tokens=100)
    waiting = list(into.waiting)
    # Behind two 100-step sequences in a batch of two, 10 more steps take at least 5.5 s.
    with pytest.raises(PastDeadline) as shed:
        submit(into, prompt_of(40, 2000), max_new_tokens=10, deadline=NOW + 5)
    assert shed.value.expected_s > shed.value.allowed_s == pytest.approx(5)
    assert list(into.waiting) == waiting
    submit(into, prompt_of(40, 3000), max_new_tokens=10, deadline=NOW + 6)
    assert len(into.waiting) == 3


def test_less_urgent_work_queued_is_not_ahead_of_an_urgent_request():
    into = scheduler(max_batch_size=1)
    taught(into.rate)
    for offset in range(4):
        submit(into, prompt_of(20, 1000 * offset), max_new_tokens=50, priority=10)
    with pytest.raises(PastDeadline):
        submit(into, prompt_of(20, 9000), max_new_tokens=5, deadline=NOW + 3, priority=10)
    submit(into, prompt_of(20, 9000), max_new_tokens=5, deadline=NOW + 3, priority=-10)


def test_prompt_tokens_the_prefix_cache_holds_are_not_counted_as_work():
    into = scheduler()
    runner = ScriptedRunner({})
    shared = prompt_of(64)
    submit(into, shared, max_new_tokens=1)
    while into.has_work:
        step(into, runner)
    again, _ = submit(into, shared + [7, 8, 9], max_new_tokens=1)
    assert again.prompt_work == 3


def test_a_request_that_would_miss_its_deadline_even_alone_is_queued_not_shed():
    """Its max_new_tokens is a cap an end of sequence may cut short, and retrying would not help:
    it runs, and ends at its deadline if it must (504 naming its limit)."""
    into = scheduler()
    taught(into.rate)
    submit(into, prompt_of(20), max_new_tokens=100)
    hopeless, _ = submit(into, prompt_of(20, 5000), max_new_tokens=400, deadline=NOW + 0.3)
    assert hopeless in into.waiting
