"""A circuit breaker: stops calling a provider that keeps failing, and tries it again after a cool-down.

Closed, calls go through; `failure_threshold` failures in a row open it. Open, every call is refused
at once until `cooldown_s` has passed; then it is half-open: one call (the probe) goes through, the
others are still refused. The probe's success closes it; its failure opens it for another cool-down.
A call that ends saying nothing of the provider's health (the caller left) frees the probe's place.

One breaker per provider per API worker process: each worker learns of an outage by its own calls.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def level(self) -> int:
        """0 closed, 1 half-open, 2 open: the value of the state gauge."""
        return list(CircuitState).index(self)


class CircuitBreaker:
    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if self.retry_in_s() > 0 else CircuitState.HALF_OPEN

    def retry_in_s(self) -> float:
        """Seconds until an open circuit lets a probe through; 0 when closed or half-open."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go now; a call let through half-open is the probe, and must be followed
        by record_success, record_failure or record_neither."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def record_neither(self) -> None:
        """The call ended without a word on the provider's health: a probe's place is free again."""
        self._probing = False
