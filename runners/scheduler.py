"""Iteration-level (continuous) batching: one thread runs batch steps over every running sequence.

Each step feeds the model one decode token per running sequence plus prompt chunks of waiting ones
(at most `prefill_budget` prompt tokens a step, so a long prompt never stalls the others). A request
joins at the next step and leaves the moment it ends: end of sequence, its own max tokens, its
deadline, or cancellation. Greedy and sampled rows share a step; each row samples on its own
(runners/sampling.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metrics import SchedulerMetrics

from .kv_cache import BLOCK_SIZE, PADDING_SLOT, CacheFull, PagedKVCache, block_hashes
from .paged_attention import PromptChunk, StepPlan, group_chunks
from .sampling import RowSampling, choose_tokens, seeded_generator

logger = logging.getLogger(__name__)

# transformers returns a 4D mask as it is: this one is never read (attention uses the step plan).
PREPARED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def is_fatal(error: Exception) -> bool:
    """A CUDA error (device-side assert, illegal address) leaves the device unusable until restart."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or "CUDA error" in str(error)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop", "length", "timeout", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    detail: str = ""


Event = TokenEvent | FinishEvent
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class SamplingRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    deadline: float  # time.monotonic()
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    request: SamplingRequest
    sink: Sink
    hashes: list[int]
    sampling: RowSampling
    cancelled: threading.Event = field(default_factory=threading.Event)
    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None  # the cache slot of every position this sequence may fill
    computed: int = 0  # tokens whose keys and values are in the cache
    cached_prompt_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_length

    def cancel(self) -> None:
        self.cancelled.set()


class BatchScheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        eos_token_ids: set[int],
        max_batch_size: int,
        prefill_budget: int,
        batch_wait_s: float = 0.0,
        name: str = "model",
    ) -> None:
        self._model = model
        self._cache = cache
        self._eos = eos_token_ids
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.batch_wait_s = batch_wait_s
        self._device = next(model.parameters()).device
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._stopped = False
        self._stop_reason = ""
        self.failure = ""  # set when the thread died: the model can serve nothing more
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self.steps = 0
        self._metrics = SchedulerMetrics.for_model(name)

    # Called from any thread.

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str) -> None:
        """Ends the thread after its current step; every sequence still there is cancelled with `reason`."""
        with self._wakeup:
            self._stopped, self._stop_reason = True, reason
            self._wakeup.notify()
        self._thread.join(timeout=60)
        for sequence in [*self._waiting, *self._running]:
            self._finish(sequence, "cancelled", reason)
        self._waiting.clear()
        self._running.clear()
        self._metrics.occupancy(0, 0)

    def submit(self, request: SamplingRequest, sink: Sink) -> Sequence:
        sampling = RowSampling(request.temperature, request.top_p, seeded_generator(request.seed, self._device))
        sequence = Sequence(request, sink, block_hashes(request.prompt_ids), sampling)
        with self._wakeup:
            stopped = self._stopped
            if not stopped:
                self._waiting.append(sequence)
                self._wakeup.notify()
        if stopped:  # raced with an unload or a failure: no thread is left to run it
            self._finish(sequence, "error" if self.failure else "cancelled", self.failure or self._stop_reason)
        return sequence

    def blocks_needed(self, request: SamplingRequest) -> int:
        return math.ceil((len(request.prompt_ids) + request.max_new_tokens) / BLOCK_SIZE)

    @property
    def capacity_blocks(self) -> int:
        return self._cache.allocator.usable

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def load(self) -> dict[str, int]:
        """Sequences in the batch and in the queue, and the prefix cache's hits (in blocks)."""
        allocator = self._cache.allocator
        return {
            "running": len(self._running),
            "waiting": self.waiting,
            "max_batch_size": self.max_batch_size,
            "free_kv_blocks": allocator.available,
            "prefix_cache_hits": allocator.prefix_hits,
            "prefix_cache_queries": allocator.prefix_queries,
            "steps": self.steps,
        }

    # The scheduler thread.

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # noqa: BLE001: a dead thread must fail its requests, never strand them
            self._fail(f"{type(error).__name__}: {error}")

    def _fail(self, failure: str) -> None:
        logger.critical("the batch scheduler stopped: %s", failure)
        with self._wakeup:
            self.failure, self._stopped, self._stop_reason = failure, True, failure
            ended = [*self._waiting, *self._running]
            self._waiting.clear()
        for sequence in ended:
            if sequence in self._running:
                self._retire(sequence, "error", failure)
            else:
                self._finish(sequence, "error", failure)
        self._metrics.occupancy(0, 0)

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopped and not self._waiting and not self._running:
                        self._metrics.occupancy(0, 0)
                        self._wakeup.wait()
                        if self.batch_wait_s and not self._running:
                            self._wakeup.wait(self.batch_wait_s)  # let a burst arrive together
                    if self._stopped:
                        return
                    self._drop_ended_waiting()
                    self._admit()
                    self._metrics.occupancy(len(self._waiting), len(self._running))
                self._drop_ended_running()
                if self._running:
                    self._step_guarded()

    def _drop_ended_waiting(self) -> None:
        now = time.monotonic()
        for sequence in list(self._waiting):
            if sequence.cancelled.is_set():
                self._waiting.remove(sequence)
                self._finish(sequence, "cancelled")
            elif now >= sequence.request.deadline:
                self._waiting.remove(sequence)
                self._finish(sequence, "timeout")

    def _drop_ended_running(self) -> None:
        now = time.monotonic()
        for sequence in list(self._running):
            if sequence.cancelled.is_set():
                self._retire(sequence, "cancelled")
            elif now >= sequence.request.deadline:
                self._retire(sequence, "timeout")

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            sequence = self._waiting[0]
            request = sequence.request
            try:
                sequence.blocks, cached = self._cache.claim(request.prompt_ids, sequence.hashes, self.blocks_needed(request))
            except CacheFull:
                return  # it waits for running sequences to give blocks back
            self._waiting.popleft()
            blocks = torch.tensor(sequence.blocks, dtype=torch.long)
            sequence.slots = (blocks[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()
            sequence.computed = sequence.cached_prompt_tokens = cached
            self._running.append(sequence)

    def _step_guarded(self) -> None:
        try:
            self._step()
        except Exception as error:  # a failed step fails its sequences, never the scheduler...
            if is_fatal(error):  # ...unless the device itself is broken
                raise
            logger.exception("batch step failed")
            for sequence in list(self._running):
                self._retire(sequence, "error", f"{type(error).__name__}: {error}")

    def _step(self) -> None:
        decoders = [s for s in self._running if s.decoding]
        tokens: list[int] = [s.output_ids[-1] for s in decoders]
        positions: list[int] = [s.computed for s in decoders]
        writes: list[torch.Tensor] = [s.slots[s.computed : s.computed + 1] for s in decoders]
        sampled: list[Sequence] = list(decoders)
        keep: list[int] = list(range(len(decoders)))
        chunks: list[PromptChunk] = []
        prefilling: list[Sequence] = []
        budget = self.prefill_budget
        now = time.monotonic()
        # Shortest remaining prompt first: a short request is never stuck behind a long prefill.
        waiting_for_prefill = sorted((s for s in self._running if not s.decoding), key=lambda s: s.prompt_length - s.computed)
        for sequence in waiting_for_prefill:
            if budget <= 0:
                break
            prefilling.append(sequence)
            start, end = sequence.computed, min(sequence.prompt_length, sequence.computed + budget)
            if start == sequence.cached_prompt_tokens:  # its first step
                self._metrics.queue_wait.observe(now - sequence.submitted_at)
                self._metrics.prompt_tokens.inc(sequence.prompt_length)
            budget -= end - start
            offset = len(tokens)
            tokens += sequence.request.prompt_ids[start:end]
            positions += range(start, end)
            writes.append(sequence.slots[start:end])
            # Slots live on the CPU (cheap to slice per step); attention indexes the cache on its device.
            kv_index = sequence.slots[:end].to(self._device)
            chunks.append(PromptChunk(offset, offset + end - start, kv_index))
            if end == sequence.prompt_length:
                sampled.append(sequence)
                keep.append(offset + end - start - 1)
        single_chunks, chunk_groups = group_chunks(chunks, self._device)
        plan = StepPlan(
            cache=self._cache,
            write_index=torch.cat(writes).to(self._device),
            decode_count=len(decoders),
            decode_kv_index=None,
            decode_lengths=None,
            chunks=single_chunks,
            chunk_groups=chunk_groups,
        )
        if decoders:
            plan.decode_kv_index, plan.decode_lengths = self._decode_layout(decoders)
        logits = self._model(
            input_ids=torch.tensor([tokens], device=self._device),
            position_ids=torch.tensor([positions], device=self._device),
            attention_mask=PREPARED_MASK,
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self._device),
            engine_step=plan,
        ).logits[0]
        self.steps += 1
        self._metrics.step_sequences.observe(len(decoders) + len(prefilling))
        for sequence, chunk in zip(prefilling, chunks):
            sequence.computed = chunk.context
            if sequence.decoding:
                self._cache.remember_prompt(sequence.blocks, sequence.hashes, sequence.request.prompt_ids)
        for sequence in decoders:
            sequence.computed += 1
        self._emit(sampled, choose_tokens(logits, [s.sampling for s in sampled]))

    def _decode_layout(self, decoders: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([s.computed + 1 for s in decoders])
        longest = int(lengths.max())
        index = torch.full((len(decoders), longest), PADDING_SLOT, dtype=torch.long)
        for row, sequence in enumerate(decoders):
            index[row, : sequence.computed + 1] = sequence.slots[: sequence.computed + 1]
        return index.to(self._device), lengths.to(self._device)

    def _emit(self, sequences: list[Sequence], token_ids: list[int]) -> None:
        now = time.monotonic()
        for sequence, token_id in zip(sequences, token_ids):
            sequence.output_ids.append(token_id)
            sequence.last_token_at = now
            if len(sequence.output_ids) == 1:
                sequence.first_token_at = now
                self._metrics.time_to_first_token.observe(now - sequence.submitted_at)
            if token_id in self._eos:
                self._retire(sequence, "stop")
                continue
            sequence.sink(TokenEvent(token_id))
            if len(sequence.output_ids) >= sequence.request.max_new_tokens:
                self._retire(sequence, "length")

    def _retire(self, sequence: Sequence, reason: str, detail: str = "") -> None:
        self._running.remove(sequence)
        self._cache.allocator.release(sequence.blocks)
        sequence.blocks = []
        self._finish(sequence, reason, detail)

    def _finish(self, sequence: Sequence, reason: str, detail: str = "") -> None:
        generated = len(sequence.output_ids)
        if generated:
            self._metrics.generated_tokens.inc(generated)
        if generated > 1:
            decoding_s = sequence.last_token_at - sequence.first_token_at
            self._metrics.time_per_output_token.observe(decoding_s / (generated - 1))
        sequence.sink(
            FinishEvent(reason, sequence.prompt_length, len(sequence.output_ids), sequence.cached_prompt_tokens, detail)
        )
