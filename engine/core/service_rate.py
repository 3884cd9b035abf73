"""How fast one model's engine core serves, learned from its own steps, and when a new request
would finish behind the work already admitted: what admission sheds by (scheduler.add, and the
API workers through queue_board.py).

A step's time is taken as P x (prompt tokens it computes) + D (one step of the batch). D is
learned from steps that compute no prompt, P from the others, less D. Both are moving averages
that follow a slower step at once and a faster one gradually: a machine that gets busier (another
process on the cores) must show in the next admissions, or they are admitted at the old rate and
miss their deadlines; one that gets quieter costs only some refusals meanwhile.

A request's finish is estimated by replaying the batch's slots: the running sequences hold theirs
for their decode steps left, the sequences queued ahead take each slot as it frees, and the new
one starts decoding when a slot frees for it. Every prompt ahead, and its own, is computed before
it is done. Steps are counted at D whatever the batch's size: D is learned at the sizes the
workload runs, and a full batch (when the queue matters) is what it learns most.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    """What a sequence still needs: prompt tokens to compute, and decode steps (at most)."""

    prompt_tokens: int
    decode_steps: int


# A prompt chunk of this many tokens or more moves P by the full weight of a sample.
FULL_WEIGHT_PROMPT_TOKENS = 64


class PastDeadline(Exception):
    """At the rate this engine serves, the request would finish after its deadline."""

    def __init__(self, expected_s: float, allowed_s: float) -> None:
        super().__init__(f"expected to finish in {expected_s:.1f}s, past its deadline in {allowed_s:.1f}s")
        self.expected_s, self.allowed_s = expected_s, allowed_s


class ServiceRate:
    def __init__(self, slower: float = 0.5, faster: float = 0.1) -> None:
        self._slower, self._faster = slower, faster  # the moving averages' weights of a new sample
        self.prompt_token_s: float | None = None  # P
        self.decode_step_s: float | None = None  # D

    @classmethod
    def of(cls, prompt_token_s: float, decode_step_s: float) -> ServiceRate:
        """A rate measured elsewhere (the engine's, read off the queue board)."""
        rate = cls()
        rate.prompt_token_s, rate.decode_step_s = prompt_token_s, decode_step_s
        return rate

    @property
    def known(self) -> bool:
        return self.prompt_token_s is not None and self.decode_step_s is not None

    def observe(self, prompt_tokens: int, decode_rows: int, seconds: float) -> None:
        """Learns from a step that computed `prompt_tokens` prompt tokens and decoded `decode_rows` rows."""
        if not prompt_tokens:
            if decode_rows:
                self.decode_step_s = self._average(self.decode_step_s, seconds, self._slower, self._faster)
            return
        # Every step costs about D whatever it holds (the weights are read once a step): P is what its
        # prompt tokens add. A small chunk's share of that is noise, so it moves P by its size.
        sample = max(seconds - (self.decode_step_s or 0.0), 0.0) / prompt_tokens
        weight = min(1.0, prompt_tokens / FULL_WEIGHT_PROMPT_TOKENS)
        self.prompt_token_s = self._average(self.prompt_token_s, sample, weight * self._slower, weight * self._faster)

    @staticmethod
    def _average(current: float | None, sample: float, slower: float, faster: float) -> float:
        if current is None:
            return sample
        return current + (slower if sample > current else faster) * (sample - current)

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
        return rate.prompt_token_s * prompt_tokens + rate.decode_step_s * (self.slots[0] + own.decode_steps)


def check_deadline(backlog: Backlog, own: Work, rate: ServiceRate, allowed_s: float) -> float | None:
    """The seconds until `own`, behind `backlog`, would be done (None until the rate is measured).
    Raises PastDeadline when that is after `allowed_s`, unless it would miss it even alone: its
    max_new_tokens is only a cap, and a retry would not help."""
    expected = backlog.finish_in(own, rate)
    if expected is not None and expected > allowed_s:
        if Backlog.of(len(backlog.slots), ()).finish_in(own, rate) <= allowed_s:
            raise PastDeadline(expected, allowed_s)
    return expected
