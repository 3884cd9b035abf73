"""Iteration-level (continuous) batching: what each batch step runs, and what its tokens mean.

Each step carries one decode token per running sequence plus prompt chunks of waiting ones (at most
`prefill_budget` prompt tokens a step, shortest remaining prompt first, so a long prompt never
stalls the others). A request joins at the next step and leaves the moment it ends: end of
sequence, its own max tokens, its deadline, or cancellation.

The scheduler decides and keeps the books; it holds no tensors. The model runner turns a
ScheduledStep into tensors, runs the model and samples; the engine core (engine_core.py) drives
the two from its thread. Not thread-safe: the engine core calls it under its lock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import cached_property

from metrics import SchedulerMetrics

from .block_manager import BLOCK_SIZE, BlockManager, CacheFull
from .sequence import BlockCopy, FinishEvent, FinishReason, Sequence, TokenEvent


class QueueFull(Exception):
    """The waiting queue holds max_queue_size sequences already."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Prompt tokens [start, end) of a sequence, computed in this step."""

    sequence: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        """Its last token's logits give the sequence's first new token."""
        return self.end == self.sequence.prompt_length


@dataclass(frozen=True)
class ScheduledStep:
    decoding: list[Sequence]  # one new token each, at position `computed`
    prefilling: list[ScheduledChunk]  # shortest remaining prompt first
    copies: list[BlockCopy]  # to make before the step's attention reads the cache
    finished_ids: list[int]  # sequences that ended since the last step: the runner may forget them

    @cached_property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from this step, in the order the runner returns them."""
        return [*self.decoding, *(chunk.sequence for chunk in self.prefilling if chunk.completes_prompt)]


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
        self._metrics = metrics
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

    def add(self, sequence: Sequence) -> None:
        if self.queue_full:
            raise QueueFull(f"{len(self.waiting)} sequences are waiting (max_queue_size={self.max_queue_size})")
        self.waiting.append(sequence)

    def schedule(self, now: float) -> ScheduledStep | None:
        """The next step, or None when no sequence is running."""
        self._drop_ended_waiting(now)
        self._admit()
        self._drop_ended_running(now)
        self._metrics.occupancy(len(self.waiting), len(self.running))
        if not self.running:
            return None
        decoding = [sequence for sequence in self.running if sequence.decoding]
        prefilling: list[ScheduledChunk] = []
        copies: list[BlockCopy] = []
        budget = self.prefill_budget
        for sequence in sorted((s for s in self.running if not s.decoding), key=lambda s: s.prompt_length - s.computed):
            if budget <= 0:
                break
            start, end = sequence.computed, min(sequence.prompt_length, sequence.computed + budget)
            if start == sequence.cached_prompt_tokens:  # its first chunk
                self._metrics.queue_wait.observe(now - sequence.submitted_at)
                self._metrics.prompt_tokens.inc(sequence.prompt_length)
                if sequence.pending_copy is not None:
                    copies.append(sequence.pending_copy)
            prefilling.append(ScheduledChunk(sequence, start, end))
            budget -= end - start
        finished, self._finished_ids = self._finished_ids, []
        return ScheduledStep(decoding, prefilling, copies, finished)

    def update(self, step: ScheduledStep, token_ids: list[int], now: float) -> None:
        """Books a step the runner has run: `token_ids` holds one token per `step.sampled` sequence."""
        self.steps += 1
        self._metrics.step_sequences.observe(len(step.decoding) + len(step.prefilling))
        for chunk in step.prefilling:
            sequence = chunk.sequence
            if sequence.pending_copy is not None:  # made before this step's attention: the source can go
                self.blocks.release([sequence.pending_copy.source])
                sequence.pending_copy = None
            sequence.computed = chunk.end
            if sequence.decoding:
                self.blocks.remember_prompt(sequence.blocks, sequence.hashes, sequence.prompt_ids)
        for sequence in step.decoding:
            sequence.computed += 1
        for sequence, token_id in zip(step.sampled, token_ids):
            self._emit(sequence, token_id, now)

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

    def _admit(self) -> None:
        """Oldest first, while the batch has room and the cache has blocks."""
        while self.waiting and len(self.running) < self.max_batch_size:
            sequence = self.waiting[0]
            needed = self.blocks_needed(sequence.prompt_length, sequence.request.max_new_tokens)
            try:
                claim = self.blocks.claim(sequence.prompt_ids, sequence.hashes, needed)
            except CacheFull:
                return  # it waits for running sequences to give blocks back
            self.waiting.popleft()
            sequence.blocks, sequence.pending_copy = claim.blocks, claim.copy
            sequence.computed = sequence.cached_prompt_tokens = claim.cached_tokens
            self.running.append(sequence)

    def _emit(self, sequence: Sequence, token_id: int, now: float) -> None:
        sequence.output_ids.append(token_id)
        sequence.last_token_at = now
        if len(sequence.output_ids) == 1:
            sequence.first_token_at = now
            self._metrics.time_to_first_token.observe(now - sequence.submitted_at)
        if token_id in self._eos and not sequence.request.ignore_eos:
            self._retire(sequence, FinishReason.STOP)
            return
        sequence.sink(TokenEvent(token_id))
        if len(sequence.output_ids) >= sequence.request.max_new_tokens:
            self._retire(sequence, FinishReason.LENGTH)

    def _retire(self, sequence: Sequence, reason: FinishReason, detail: str = "") -> None:
        self.running.remove(sequence)
        held = sequence.blocks + ([sequence.pending_copy.source] if sequence.pending_copy else [])
        self.blocks.release(held)
        sequence.blocks, sequence.pending_copy = [], None
        self.finish(sequence, reason, detail)
