"""How fast one model's engine core serves, learned from its own steps, and when a new request
would finish behind the work already admitted: what admission sheds by (scheduler.add, and the
API workers through queue_board.py).

A step's time is taken as P x (prompt tokens it computes) + D (one step of the batch). D is
learned from steps that compute no prompt, P from the others, less D; both over the last few
seconds of steps (ServiceRate).

A request's finish is estimated by replaying the batch's slots: the running sequences hold theirs
for their decode steps left, the sequences queued ahead take each slot as it frees, and the new
one starts decoding when a slot frees for it. Every prompt ahead, and its own, is computed before
it is done. Steps are counted at D whatever the batch's size: D is learned at the sizes the
workload runs, and a full batch (when the queue matters) is what it learns most.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    """What a sequence still needs: prompt tokens to compute, and decode steps (at most)."""

    prompt_tokens: int
    decode_steps: int


class PastDeadline(Exception):
    """At the rate this engine serves, the request would finish after its deadline."""

    def __init__(self, expected_s: float, allowed_s: float) -> None:
        super().__init__(f"expected to finish in {expected_s:.1f}s, past its deadline in {allowed_s:.1f}s")
        self.expected_s, self.allowed_s = expected_s, allowed_s


class ServiceRate:
    """P, and D as D1 x c(rows): a one-row step's time and the cost shape c(rows) = 1 + k(rows - 1).
    k is the model's and the hardware's, measured once (calibrate_rows: the engine core runs steps
    of one row and of a full batch at load). D1 and P are means over the steps of the last WINDOW_S
    seconds (at least the last MIN_SAMPLES of each kind): a deadline is met or missed by a sum of
    many steps, so a mean is what the replay needs; an outlier (the engine descheduled for a second
    by another process) counts as the one step it is, and a machine that gets busier shows within
    the window."""

    WINDOW_S = 5.0
    MIN_SAMPLES = 8

    def __init__(self) -> None:
        self._decode_steps: deque[tuple[float, int, float]] = deque()  # (when, rows, seconds)
        self._prompt_steps: deque[tuple[float, int, float]] = deque()  # (when, prompt tokens, seconds less D)
        self.prompt_token_s: float | None = None  # P
        self.decode_step_s: float | None = None  # D1
        self.row_cost = 0.0  # k

    @classmethod
    def of(cls, prompt_token_s: float, decode_step_s: float, row_cost: float) -> ServiceRate:
        """A rate measured elsewhere (the engine's, read off the queue board)."""
        rate = cls()
        rate.prompt_token_s, rate.decode_step_s, rate.row_cost = prompt_token_s, decode_step_s, row_cost
        return rate

    @property
    def known(self) -> bool:
        return self.prompt_token_s is not None and self.decode_step_s is not None

    def step_s(self, rows: int) -> float:
        """A decode step's seconds at this many rows."""
        return self.decode_step_s * self._shape(rows)

    def _shape(self, rows: int) -> float:
        return 1.0 + self.row_cost * (max(rows, 1) - 1)

    def observe(self, prompt_tokens: int, decode_rows: int, seconds: float, at: float | None = None) -> None:
        """Learns from a step, ended `at` (time.monotonic()), that computed `prompt_tokens` prompt
        tokens and decoded `decode_rows` rows."""
        at = time.monotonic() if at is None else at
        if not prompt_tokens:
            if decode_rows:
                self._decode_steps.append((at, decode_rows, seconds))
                self._trim(self._decode_steps, at)
                one_row = [seconds / self._shape(rows) for _, rows, seconds in self._decode_steps]
                self.decode_step_s = sum(one_row) / len(one_row)
            return
        # Every step costs about D whatever it holds (the weights are read once a step): P is what its
        # prompt tokens add, as a ratio of sums, so that a small chunk's noise weighs by its size.
        decoding = self.step_s(decode_rows) if self.decode_step_s is not None else 0.0
        self._prompt_steps.append((at, prompt_tokens, max(seconds - decoding, 0.0)))
        self._trim(self._prompt_steps, at)
        tokens = sum(sample[1] for sample in self._prompt_steps)
        self.prompt_token_s = sum(sample[2] for sample in self._prompt_steps) / tokens

    def median_step_s(self, rows: int) -> float | None:
        """The median of the recent decode steps of this many rows."""
        steps = sorted(seconds for _, step_rows, seconds in self._decode_steps if step_rows == rows)
        return steps[len(steps) // 2] if steps else None

    def calibrate_rows(self, rows: int) -> None:
        """Sets k from the recent steps of one row and of `rows` rows (their medians)."""
        one_row, full = self.median_step_s(1), self.median_step_s(rows)
        if one_row and full and rows > 1:
            self.row_cost = min(1.0, max(0.0, (full / one_row - 1) / (rows - 1)))
            one_row_steps = [seconds / self._shape(step_rows) for _, step_rows, seconds in self._decode_steps]
            self.decode_step_s = sum(one_row_steps) / len(one_row_steps)

    def _trim(self, samples: deque, now: float) -> None:
        while len(samples) > self.MIN_SAMPLES and samples[0][0] < now - self.WINDOW_S:
            samples.popleft()

    def finish_in(self, running: Iterable[Work], ahead: Iterable[Work], own: Work, batch_size: int) -> float | None:
        """Seconds until `own` would be done behind the `running` sequences and those queued `ahead`
        of it (in queue order); None until both rates have been measured."""
        return Backlog.of(batch_size, (*running, *ahead)).finish_in(own, self)


@dataclass
class Backlog:
    """The batch slots' replay of work admitted: the decode step at which each slot frees (a heap),
    and the prompt tokens still to compute."""

    slots: list[int]
    prompt_tokens: int = 0

    @classmethod
    def of(cls, batch_size: int, works: Iterable[Work]) -> Backlog:
        backlog = cls([0] * batch_size)
        for work in works:
            backlog.add(work)
        return backlog

    def add(self, work: Work) -> None:
        """The work takes the first slot that frees, for its decode steps."""
        self.prompt_tokens += work.prompt_tokens
        heapq.heapreplace(self.slots, self.slots[0] + work.decode_steps)

    def finish_in(self, own: Work, rate: ServiceRate) -> float | None:
        """Seconds until `own`, behind this backlog, would be done: every prompt ahead and its own are
        computed, and it decodes from when a slot frees for it."""
        if not rate.known:
            return None
        prompt_tokens = self.prompt_tokens + own.prompt_tokens
        # The batch holds the rows the backlog keeps busy, and this one's.
        rows = min(len(self.slots), sum(1 for slot in self.slots if slot > 0) + 1)
        return rate.prompt_token_s * prompt_tokens + rate.step_s(rows) * (self.slots[0] + own.decode_steps)


# Admission plans for a request to finish within this share of its deadline: the estimate is a mean,
# and the steps ahead of it vary about it (another process's load comes and goes).
PLANNED_SHARE_OF_DEADLINE = 0.8


def check_deadline(backlog: Backlog, own: Work, rate: ServiceRate, allowed_s: float) -> float | None:
    """The seconds until `own`, behind `backlog`, would be done (None until the rate is measured).
    Raises PastDeadline when that is after its share of `allowed_s`, unless it would miss that even
    alone: its max_new_tokens is only a cap, and a retry would not help."""
    expected = backlog.finish_in(own, rate)
    planned_s = PLANNED_SHARE_OF_DEADLINE * allowed_s
    if expected is not None and expected > planned_s:
        if Backlog.of(len(backlog.slots), ()).finish_in(own, rate) <= planned_s:
            raise PastDeadline(expected, allowed_s)
    return expected
