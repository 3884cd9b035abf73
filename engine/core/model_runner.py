"""The model runner: turns a scheduled step into the model's inputs, runs it and samples.

A step is one flat row of tokens: one decode token per decoding sequence, then the prompt chunks.
Where each token's keys and values go, and what each attends to, reaches attention as a StepPlan
(layers/paged_attention.py); the logits are computed only at the positions that give a token, and
at scoring requests' scored positions. Before sampling, each row's masks apply: end-of-sequence
tokens until min_new_tokens, and a grammar's disallowed tokens (grammar.py), one bitmask row per
constrained sequence.
"""

from __future__ import annotations

import threading

import torch

from ..layers.paged_attention import PromptChunk, StepPlan, group_chunks
from ..models.cpu_threads import StepThreads
from .block_manager import BLOCK_SIZE, PADDING_BLOCK
from .engine_core import StepAborted, StepRunner
from .grammar import allocate_bitmask, apply_bitmask
from .kv_cache import PagedKVCache
from .sampling import RowSampling, choose_tokens, scored_logprobs, seeded_generator, token_logprobs
from .scheduler import ScheduledStep, StepOutput
from .sequence import Sequence, TokenMask

# transformers returns a 4D mask as it is: this one is never read (attention uses the step plan).
PREPARED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
BLOCK_OFFSETS = torch.arange(BLOCK_SIZE)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of decoder layers: the ModuleList as long as its config's layer count (none
    found: steps cannot be aborted, only finished)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def slot_of(blocks: list[int], position: int) -> int:
    return blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


def slots_of(block_table: torch.Tensor) -> torch.Tensor:
    """[..., blocks] block ids -> [..., blocks * BLOCK_SIZE]: the cache slot of every position they hold."""
    return (block_table[..., None] * BLOCK_SIZE + BLOCK_OFFSETS).flatten(-2)


class ModelRunner(StepRunner):
    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        eos_token_ids: set[int],
        step_threads: StepThreads | None = None,
    ) -> None:
        self._model = model
        self._cache = cache
        self._device = next(model.parameters()).device
        self._step_threads = step_threads if self._device.type == "cpu" else None
        self._eos_index = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=self._device)
        self._generators: dict[int, torch.Generator] = {}  # a seeded sequence's own, kept across its steps
        self._grammars: dict[int, TokenMask] = {}  # a constrained sequence's grammar state, kept likewise
        self._abort = threading.Event()
        for layer in decoder_layers(model):
            layer.register_forward_pre_hook(self._stop_if_aborted)

    def execute(self, step: ScheduledStep) -> StepOutput:
        for seq_id in step.finished_ids:
            self._generators.pop(seq_id, None)
            self._grammars.pop(seq_id, None)
        if self._step_threads is not None:
            self._step_threads.apply(torch.set_num_threads)
        with torch.inference_mode():
            for copy in step.copies:
                self._cache.copy_tokens(copy.source, copy.target, copy.tokens)
            logits = self._forward(step)
            sampled = step.sampled
            scores = self._scores(step, logits[len(sampled) :])
            logits = logits[: len(sampled)]
            self._mask_early_ends(logits, sampled)
            constrained = self._mask_grammars(logits, sampled)
            rows = [self._sampling(sequence) for sequence in sampled]
            token_ids = choose_tokens(logits, rows)
            failed = {}
            for row, grammar in constrained:
                try:
                    grammar.accept(token_ids[row])
                except ValueError as error:  # that sequence alone fails; its batch goes on
                    failed[sampled[row].seq_id] = f"the grammar refused token {token_ids[row]}: {error}"
            logprobs = token_logprobs(logits, rows, token_ids) if any(r.logprobs is not None for r in rows) else None
            return StepOutput(token_ids, logprobs, scores, failed)

    def abort(self) -> None:
        self._abort.set()

    def reset_abort(self) -> None:
        self._abort.clear()

    def _stop_if_aborted(self, layer: torch.nn.Module, args: tuple) -> None:
        """Before each decoder layer. Stopping there is safe: the layers before it only wrote keys and
        values that the step, planned again, writes once more, and nothing was sampled yet."""
        if self._abort.is_set():
            raise StepAborted

    def is_fatal(self, error: Exception) -> bool:
        """A CUDA error (device-side assert, illegal address) leaves the device unusable until restart."""
        accelerator_error = getattr(torch, "AcceleratorError", ())
        return isinstance(error, accelerator_error) or "CUDA error" in str(error)

    def _forward(self, step: ScheduledStep) -> torch.Tensor:
        """[sampled sequences + scored positions, vocabulary]: the logits that give each sampled
        sequence its token, then those at each of `step.scored`'s positions, in order."""
        decoding = step.decoding
        tokens = [sequence.output_ids[-1] for sequence in decoding]
        positions = [sequence.computed for sequence in decoding]
        writes = [torch.tensor([slot_of(s.blocks, s.computed) for s in decoding], dtype=torch.long)]
        keep = list(range(len(decoding)))
        scored: list[int] = []
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
            if scheduled.completes_prompt and not sequence.request.scoring:
                keep.append(offset + end - start - 1)
            scored += (offset + position - start for position in scheduled.scored_positions)
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
            logits_to_keep=torch.tensor(keep + scored, dtype=torch.long, device=self._device),
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

    @staticmethod
    def _scores(step: ScheduledStep, logits: torch.Tensor) -> dict[int, dict[int, tuple[float, ...]]]:
        """seq_id -> scored position -> its tokens' log probabilities, from the scored positions' logits."""
        wanted = []  # (seq_id, position, its tokens), in the order _forward kept their logits
        for chunk in step.scored:
            tokens_at = {scored.position: scored.token_ids for scored in chunk.sequence.request.scored}
            wanted += [(chunk.sequence.seq_id, position, tokens_at[position]) for position in chunk.scored_positions]
        found: dict[int, dict[int, tuple[float, ...]]] = {}
        for (seq_id, position, _), logprobs in zip(wanted, scored_logprobs(logits, [ids for *_, ids in wanted])):
            found.setdefault(seq_id, {})[position] = logprobs
        return found

    def _mask_grammars(self, logits: torch.Tensor, sampled: list[Sequence]) -> list[tuple[int, TokenMask]]:
        """Masks, in place, the tokens each constrained row's grammar does not allow next; the rows and
        their grammars, which follow the chosen tokens once sampled."""
        constrained = []
        for row, sequence in enumerate(sampled):
            if sequence.request.grammar is not None:
                grammar = self._grammars.get(sequence.seq_id)
                if grammar is None:
                    grammar = self._grammars[sequence.seq_id] = sequence.request.grammar()
                constrained.append((row, grammar))
        if constrained:
            bitmask = allocate_bitmask(len(constrained), logits.shape[-1])
            for place, (_, grammar) in enumerate(constrained):
                grammar.fill_mask(bitmask, place)
            apply_bitmask(logits, bitmask, [row for row, _ in constrained])
        return constrained

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
        return RowSampling(request.temperature, request.top_p, generator, request.logprobs)
