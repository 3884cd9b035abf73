"""Iteration-level (continuous) batching: what each batch step runs, and what its tokens mean.

Each step carries one decode token per running sequence plus prompt chunks of waiting ones (at most
`prefill_budget` prompt tokens a step, highest priority then shortest remaining prompt first, so a
long prompt never stalls the others). A request joins at the next step and leaves the moment it
ends: end of sequence, its own max tokens, its deadline, or cancellation.

Priority (lower first) orders the queue (then arrival). When the queue is full, a request of higher
priority than the lowest waiting one takes that one's place, and the one dropped ends as REFUSED. A
request more urgent than one already running need not wait for a slot: it may join a full batch,
up to a headroom of a quarter of its size. A step that computes a prompt serves no sequence less
urgent than it (their prompts and decode tokens wait a step), so that the urgent one's step is as
short as it would be alone. Prompts of less than default priority (background work) are computed
a quarter of the prefill budget a step, so that no step of theirs runs long when an urgent request
arrives behind it (engine_core.py aborts such a step, but not the one that redoes it).

A scoring request (SamplingRequest.scored) generates nothing: its prompt's logits at the scored
positions answer it, and it ends as its prompt completes.

The scheduler decides and keeps the books; it holds no tensors. The model runner turns a
ScheduledStep into tensors, runs the model and samples; the engine core (engine_core.py) drives
the two from its thread. Not thread-safe: the engine core calls it under its lock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from metrics import SchedulerMetrics

from .block_manager import BLOCK_SIZE, BlockManager, CacheFull
from .sequence import (
    DEFAULT_PRIORITY,
    BlockCopy,
    FinishEvent,
    FinishReason,
    ScoreEvent,
    Sequence,
    TokenEvent,
    TokenLogprobs,
)
from .service_rate import Backlog, PastDeadline, ServiceRate, Work, check_deadline


class QueueFull(Exception):
    """The waiting queue holds max_queue_size sequences already."""

    def __init__(self, waiting: int, max_queue_size: int) -> None:
        super().__init__(f"{waiting} sequences are waiting (max_queue_size={max_queue_size})")
        self.waiting, self.max_queue_size = waiting, max_queue_size


@dataclass(frozen=True)
class ScheduledChunk:
    """Prompt tokens [start, end) of a sequence, computed in this step."""

    sequence: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        """Its last token's logits give the sequence's first new token (unless it is a scoring request)."""
        return self.end == self.sequence.prompt_length

    @property
    def scored_positions(self) -> list[int]:
        """The positions of its scoring request's ScoredPositions that this chunk computes."""
        return [scored.position for scored in self.sequence.request.scored if self.start <= scored.position < self.end]


@dataclass(frozen=True)
class ScheduledStep:
    decoding: list[Sequence]  # one new token each, at position `computed`
    prefilling: list[ScheduledChunk]  # shortest remaining prompt first
    copies: list[BlockCopy]  # to make before the step's attention reads the cache
    finished_ids: list[int]  # sequences that ended since the last step: the runner may forget them
    planned_at: float  # time.monotonic() when it was scheduled

    @cached_property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from this step, in the order the runner returns them."""
        completing = (chunk.sequence for chunk in self.prefilling if chunk.completes_prompt)
        return [*self.decoding, *(sequence for sequence in completing if not sequence.request.scoring)]

    @cached_property
    def sequence_ids(self) -> set[int]:
        return {sequence.seq_id for sequence in (*self.decoding, *(chunk.sequence for chunk in self.prefilling))}

    @cached_property
    def most_urgent(self) -> float:
        """The priority of its most urgent sequence."""
        return min(sequence.request.priority for sequence in (*self.decoding, *(c.sequence for c in self.prefilling)))

    @cached_property
    def scored(self) -> list[ScheduledChunk]:
        """The chunks that compute scored positions, in prefill order."""
        return [chunk for chunk in self.prefilling if chunk.scored_positions]


@dataclass(frozen=True)
class StepOutput:
    """What the runner gives back for a step."""

    token_ids: list[int]  # one per `step.sampled` sequence, in order
    logprobs: list[TokenLogprobs | None] | None = None  # likewise, when any of them asked for log probabilities
    # seq_id -> scored position -> the log probabilities of that ScoredPosition's tokens
    scores: dict[int, dict[int, tuple[float, ...]]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # seq_id -> why its grammar refused its token: it ends UNWRITABLE


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        eos_token_ids: set[int],
        max_batch_size: int,
        prefill_budget: int,
        max_queue_size: int,
        metrics: SchedulerMetrics,
    ) -> None:
        self.blocks = blocks
        self._eos = eos_token_ids
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.max_queue_size = max_queue_size
        self.priority_headroom = max(1, max_batch_size // 4)
        self.background_prefill_budget = max(BLOCK_SIZE, prefill_budget // 4)
        self._metrics = metrics
        self.rate = ServiceRate()  # learned from the steps the engine core runs (EngineCore._run)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self.steps = 0

    @staticmethod
    def blocks_needed(prompt_tokens: int, max_new_tokens: int) -> int:
        return math.ceil((prompt_tokens + max_new_tokens) / BLOCK_SIZE)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queue_full(self) -> bool:
        return len(self.waiting) >= self.max_queue_size

    def refuses(self, priority: int) -> bool:
        """Whether `add` would refuse a sequence of this priority now."""
        return self.queue_full and self.waiting[-1].request.priority <= priority

    @property
    def load(self) -> dict[str, int]:
        """Sequences in the batch and in the queue, and the prefix cache's hits (in blocks)."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "max_batch_size": self.max_batch_size,
            "free_kv_blocks": self.blocks.available,
            "prefix_cache_hits": self.blocks.prefix_hits,
            "prefix_cache_queries": self.blocks.prefix_queries,
            "steps": self.steps,
        }

    def add(self, sequence: Sequence, now: float) -> None:
        """Queues the sequence in priority order. Raises PastDeadline when the engine's measured rate
        says the work ahead of it (less urgent work is not ahead) would make it finish after its
        deadline; one that would miss it even alone is queued (its max_new_tokens is only a cap, and
        a retry would not help). A full queue drops its newest sequence of the lowest priority for it
        if that priority is lower than the sequence's, else raises QueueFull."""
        sequence.prompt_work = sequence.prompt_length - self.blocks.cached_tokens(sequence.prompt_ids, sequence.hashes)
        own = Work(sequence.prompt_work, sequence.request.max_new_tokens)
        try:
            expected = check_deadline(self.backlog(sequence.request.priority), own, self.rate, sequence.request.deadline - now)
        except PastDeadline:
            self._metrics.shed.inc()
            raise
        if expected is not None:
            self._metrics.expected_finish.observe(expected)
        if self.queue_full:
            if self.refuses(sequence.request.priority):
                raise QueueFull(len(self.waiting), self.max_queue_size)
            displaced = f"a request of priority {sequence.request.priority} took its place"
            self.finish(self.waiting.pop(), FinishReason.REFUSED, displaced)
        place = len(self.waiting)
        while place and self.waiting[place - 1].request.priority > sequence.request.priority:
            place -= 1
        self.waiting.insert(place, sequence)

    def backlog(self, priority: int) -> Backlog:
        """The work ahead of a request of this priority queued now: the running sequences' and the
        waiting ones' of the same priority or more urgent (less urgent work is not ahead)."""
        running = (
            Work(0 if s.decoding else s.prompt_length - s.computed, s.request.max_new_tokens - len(s.output_ids))
            for s in self.running
        )
        ahead = (Work(s.prompt_work, s.request.max_new_tokens) for s in self.waiting if s.request.priority <= priority)
        return Backlog.of(self.max_batch_size, (*running, *ahead))

    def schedule(self, now: float) -> ScheduledStep | None:
        """The next step, or None when no sequence is running."""
        self._drop_ended_waiting(now)
        self._admit()
        self._drop_ended_running(now)
        self._metrics.occupancy(len(self.waiting), len(self.running))
        if not self.running:
            return None
        prefill_order = sorted(
            (s for s in self.running if not s.decoding), key=lambda s: (s.request.priority, s.prompt_length - s.computed)
        )
        # The step serves no sequence less urgent than the most urgent prompt it computes.
        urgent = prefill_order[0].request.priority if prefill_order else math.inf
        decoding = [sequence for sequence in self.running if sequence.decoding and sequence.request.priority <= urgent]
        prefilling: list[ScheduledChunk] = []
        copies: list[BlockCopy] = []
        budget = self.prefill_budget if urgent <= DEFAULT_PRIORITY else self.background_prefill_budget
        for sequence in prefill_order:
            if budget <= 0 or sequence.request.priority > urgent:
                break
            start, end = sequence.computed, min(sequence.prompt_length, sequence.computed + budget)
            if start == sequence.cached_prompt_tokens and sequence.pending_copy is not None:  # its first chunk
                copies.append(sequence.pending_copy)
            prefilling.append(ScheduledChunk(sequence, start, end))
            budget -= end - start
        finished, self._finished_ids = self._finished_ids, []
        return ScheduledStep(decoding, prefilling, copies, finished, now)

    def update(self, step: ScheduledStep, output: StepOutput, now: float) -> None:
        """Books a step the runner has run."""
        self.steps += 1
        self._metrics.step_sequences.observe(len(step.decoding) + len(step.prefilling))
        for chunk in step.prefilling:
            sequence = chunk.sequence
            if chunk.start == sequence.cached_prompt_tokens:  # booked once run: an aborted step is planned again
                self._metrics.queue_wait.observe(step.planned_at - sequence.submitted_at)
                self._metrics.prompt_tokens.inc(sequence.prompt_length)
            if sequence.pending_copy is not None:  # made before this step's attention: the source can go
                self.blocks.release([sequence.pending_copy.source])
                sequence.pending_copy = None
            sequence.computed = chunk.end
            sequence.scores.update(output.scores.get(sequence.seq_id, {}))
            if sequence.decoding:
                self.blocks.remember_prompt(sequence.blocks, sequence.hashes, sequence.prompt_ids)
                if sequence.request.scoring:
                    scores = tuple(sequence.scores[scored.position] for scored in sequence.request.scored)
                    sequence.sink(ScoreEvent(scores))
                    self._retire(sequence, FinishReason.STOP)
        for sequence in step.decoding:
            sequence.computed += 1
        logprobs = output.logprobs or [None] * len(step.sampled)
        for sequence, token_id, token_logprobs in zip(step.sampled, output.token_ids, logprobs):
            if sequence.seq_id in output.failed:
                self._retire(sequence, FinishReason.UNWRITABLE, output.failed[sequence.seq_id])
            else:
                self._emit(sequence, token_id, token_logprobs, now)

    def fail_running(self, detail: str) -> None:
        """Ends every running sequence with an error: the step they were in failed."""
        for sequence in list(self.running):
            self._retire(sequence, FinishReason.ERROR, detail)

    def finish_all(self, reason: FinishReason, detail: str = "") -> None:
        """Ends every sequence, waiting or running: the engine core is stopping."""
        for sequence in list(self.running):
            self._retire(sequence, reason, detail)
        while self.waiting:
            self.finish(self.waiting.popleft(), reason, detail)
        self._metrics.occupancy(0, 0)

    def finish(self, sequence: Sequence, reason: FinishReason, detail: str = "") -> None:
        """Tells the sequence's caller how it ended; it must hold no blocks by now."""
        generated = len(sequence.output_ids)
        if generated:
            self._metrics.generated_tokens.inc(generated)
        if generated > 1:
            decoding_s = sequence.last_token_at - sequence.first_token_at
            self._metrics.time_per_output_token.observe(decoding_s / (generated - 1))
        self._finished_ids.append(sequence.seq_id)
        sequence.sink(FinishEvent(reason, sequence.prompt_length, generated, sequence.cached_prompt_tokens, detail))

    def _drop_ended_waiting(self, now: float) -> None:
        for sequence in list(self.waiting):
            reason = self._ended(sequence, now)
            if reason is not None:
                self.waiting.remove(sequence)
                self.finish(sequence, reason)

    def _drop_ended_running(self, now: float) -> None:
        for sequence in list(self.running):
            reason = self._ended(sequence, now)
            if reason is not None:
                self._retire(sequence, reason)

    @staticmethod
    def _ended(sequence: Sequence, now: float) -> FinishReason | None:
        if sequence.cancelled.is_set():
            return FinishReason.CANCELLED
        if now >= sequence.request.deadline:
            return FinishReason.TIMEOUT
        return None

    def _has_room_for(self, sequence: Sequence) -> bool:
        if len(self.running) < self.max_batch_size:
            return True
        return len(self.running) < self.max_batch_size + self.priority_headroom and any(
            running.request.priority > sequence.request.priority for running in self.running
        )

    def _admit(self) -> None:
        """In queue order, while the batch has room and the cache has blocks."""
        while self.waiting and self._has_room_for(self.waiting[0]):
            sequence = self.waiting[0]
            needed = self.blocks_needed(sequence.prompt_length, sequence.request.max_new_tokens)
            try:
                claim = self.blocks.claim(
                    sequence.prompt_ids, sequence.hashes, needed, sequence.request.first_scored_position
                )
            except CacheFull:
                return  # it waits for running sequences to give blocks back
            self.waiting.popleft()
            sequence.blocks, sequence.pending_copy = claim.blocks, claim.copy
            sequence.computed = sequence.cached_prompt_tokens = claim.cached_tokens
            self.running.append(sequence)

    def _emit(self, sequence: Sequence, token_id: int, logprobs: TokenLogprobs | None, now: float) -> None:
        sequence.output_ids.append(token_id)
        sequence.last_token_at = now
        if len(sequence.output_ids) == 1:
            sequence.first_token_at = now
            self._metrics.time_to_first_token.observe(now - sequence.submitted_at)
        if token_id in self._eos and not sequence.request.ignore_eos:
            if logprobs is not None:  # its caller asked for every token's log probability, the last one's too
                sequence.sink(TokenEvent(token_id, logprobs))
            self._retire(sequence, FinishReason.STOP)
            return
        sequence.sink(TokenEvent(token_id, logprobs))
        if len(sequence.output_ids) >= sequence.request.max_new_tokens:
            self._retire(sequence, FinishReason.LENGTH)

    def _retire(self, sequence: Sequence, reason: FinishReason, detail: str = "") -> None:
        self.running.remove(sequence)
        held = sequence.blocks + ([sequence.pending_copy.source] if sequence.pending_copy else [])
        self.blocks.release(held)
        sequence.blocks, sequence.pending_copy = [], None
        self.finish(sequence, reason, detail)
