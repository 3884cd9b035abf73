"""The model runner: turns a scheduled step into the model's inputs, runs it and samples.

A step is one flat row of tokens: one decode token per decoding sequence, then the prompt chunks.
Where each token's keys and values go, and what each attends to, reaches attention as a StepPlan
(layers/paged_attention.py); the logits are computed only at the positions that give a token.
"""

from __future__ import annotations

import torch

from ..layers.paged_attention import PromptChunk, StepPlan, group_chunks
from .block_manager import BLOCK_SIZE, PADDING_BLOCK
from .engine_core import StepRunner
from .kv_cache import PagedKVCache
from .sampling import RowSampling, choose_tokens, seeded_generator
from .scheduler import ScheduledStep
from .sequence import Sequence

# transformers returns a 4D mask as it is: this one is never read (attention uses the step plan).
PREPARED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
BLOCK_OFFSETS = torch.arange(BLOCK_SIZE)


def slot_of(blocks: list[int], position: int) -> int:
    return blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


def slots_of(block_table: torch.Tensor) -> torch.Tensor:
    """[..., blocks] block ids -> [..., blocks * BLOCK_SIZE]: the cache slot of every position they hold."""
    return (block_table[..., None] * BLOCK_SIZE + BLOCK_OFFSETS).flatten(-2)


class ModelRunner(StepRunner):
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, eos_token_ids: set[int]) -> None:
        self._model = model
        self._cache = cache
        self._device = next(model.parameters()).device
        self._eos_index = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=self._device)
        self._generators: dict[int, torch.Generator] = {}  # a seeded sequence's own, kept across its steps

    def execute(self, step: ScheduledStep) -> list[int]:
        for seq_id in step.finished_ids:
            self._generators.pop(seq_id, None)
        with torch.inference_mode():
            for copy in step.copies:
                self._cache.copy_tokens(copy.source, copy.target, copy.tokens)
            logits = self._forward(step)
            self._mask_early_ends(logits, step.sampled)
            return choose_tokens(logits, [self._sampling(sequence) for sequence in step.sampled])

    def is_fatal(self, error: Exception) -> bool:
        """A CUDA error (device-side assert, illegal address) leaves the device unusable until restart."""
        accelerator_error = getattr(torch, "AcceleratorError", ())
        return isinstance(error, accelerator_error) or "CUDA error" in str(error)

    def _forward(self, step: ScheduledStep) -> torch.Tensor:
        """[sampled sequences, vocabulary]: the logits that give each sampled sequence its token."""
        decoding = step.decoding
        tokens = [sequence.output_ids[-1] for sequence in decoding]
        positions = [sequence.computed for sequence in decoding]
        writes = [torch.tensor([slot_of(s.blocks, s.computed) for s in decoding], dtype=torch.long)]
        keep = list(range(len(decoding)))
        chunks: list[PromptChunk] = []
        for scheduled in step.prefilling:
            sequence, start, end = scheduled.sequence, scheduled.start, scheduled.end
            offset = len(tokens)
            tokens += sequence.prompt_ids[start:end]
            positions += range(start, end)
            # Slots are built on the CPU (cheap to slice); attention indexes the cache on its device.
            slots = slots_of(torch.tensor(sequence.blocks[: -(-end // BLOCK_SIZE)]))[:end]
            writes.append(slots[start:end])
            chunks.append(PromptChunk(offset, offset + end - start, slots.to(self._device)))
            if scheduled.completes_prompt:
                keep.append(offset + end - start - 1)
        single_chunks, chunk_groups = group_chunks(chunks, self._device)
        plan = StepPlan(
            cache=self._cache,
            write_index=torch.cat(writes).to(self._device),
            decode_count=len(decoding),
            decode_kv_index=None,
            decode_lengths=None,
            chunks=single_chunks,
            chunk_groups=chunk_groups,
        )
        if decoding:
            plan.decode_kv_index, plan.decode_lengths = self._decode_layout(decoding)
        return self._model(
            input_ids=torch.tensor([tokens], device=self._device),
            position_ids=torch.tensor([positions], device=self._device),
            attention_mask=PREPARED_MASK,
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self._device),
            engine_step=plan,
        ).logits[0]

    def _decode_layout(self, decoding: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of each decoding sequence's blocks ([decoders, widest], padded with the padding
        block's) and how many of them it attends to: its tokens, the new one included."""
        lengths = [sequence.computed + 1 for sequence in decoding]
        widest = -(-max(lengths) // BLOCK_SIZE)
        table = [(sequence.blocks + [PADDING_BLOCK] * widest)[:widest] for sequence in decoding]
        index = slots_of(torch.tensor(table, dtype=torch.long))
        return index.to(self._device), torch.tensor(lengths).to(self._device)

    def _mask_early_ends(self, logits: torch.Tensor, sampled: list[Sequence]) -> None:
        """Rows still short of their min_new_tokens cannot choose an end-of-sequence token."""
        short = [row for row, s in enumerate(sampled) if len(s.output_ids) < s.request.min_new_tokens]
        if short and len(self._eos_index):
            rows = torch.tensor(short, dtype=torch.long, device=logits.device)
            logits[rows[:, None], self._eos_index] = float("-inf")

    def _sampling(self, sequence: Sequence) -> RowSampling:
        request = sequence.request
        generator = None
        if request.seed is not None:
            generator = self._generators.get(sequence.seq_id)
            if generator is None:
                generator = self._generators[sequence.seq_id] = seeded_generator(request.seed, self._device)
        return RowSampling(request.temperature, request.top_p, generator)
