"""The circuit breaker: closed, open after failures in a row, half-open for one probe after the cool-down."""

from __future__ import annotations

import pytest

from adapters.circuit_breaker import CircuitBreaker, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, cooldown_s=10.0, clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def test_a_new_breaker_is_closed_and_lets_calls_through(breaker: CircuitBreaker) -> None:
    assert breaker.state is CircuitState.CLOSED and breaker.allow() and breaker.retry_in_s() == 0.0


def test_failures_below_the_threshold_keep_it_closed(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)

    assert breaker.state is CircuitState.CLOSED and breaker.allow()


def test_a_success_forgets_the_failures_before_it(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record_success()
    fail(breaker, 2)

    assert breaker.state is CircuitState.CLOSED


def test_the_threshold_of_failures_in_a_row_opens_it_for_the_cool_down(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 4

    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(6.0)


def test_after_the_cool_down_it_is_half_open_and_lets_one_probe_through(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10

    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # the others wait for the probe's outcome


def test_the_probes_success_closes_it(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    breaker.allow()
    breaker.record_success()

    assert breaker.state is CircuitState.CLOSED and breaker.allow() and breaker.allow()


def test_the_probes_failure_opens_it_for_another_cool_down(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    breaker.allow()
    breaker.record_failure()

    assert breaker.state is CircuitState.OPEN and breaker.retry_in_s() == pytest.approx(10.0)


def test_a_probe_that_ends_saying_nothing_frees_its_place(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    breaker.allow()
    breaker.record_neither()

    assert breaker.state is CircuitState.HALF_OPEN and breaker.allow()


def test_the_gauge_levels_order_the_states_by_openness() -> None:
    assert [state.level for state in (CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN)] == [0, 1, 2]


def test_a_threshold_below_one_is_refused(clock: Clock) -> None:
    with pytest.raises(ValueError, match="failure_threshold must be at least 1, got 0"):
        CircuitBreaker(0, 1.0, clock)
