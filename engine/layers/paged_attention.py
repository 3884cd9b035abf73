"""Attention over the paged KV cache, plugged into transformers' attention interface.

A batch step feeds the model one flat row of tokens: first one token per decoding sequence, then a
chunk of prompt tokens per prefilling sequence. Nothing is padded. Each layer writes the new keys
and values into their sequences' blocks, then attends: all decoding tokens in one batched call
(each against its own sequence's cache), and the prompt chunks in causal calls: chunks of
similar size share one padded call (ChunkGroup), any other has its own. Models keep their own
projections, rotary embeddings and MLPs; only attention is ours.

On the CPU in fp32 the decoding tokens' call is the engine's kernel (csrc/paged_attention.cpp),
which reads keys and values in place: gathering them into padded tensors for SDPA costs more than
the attention itself (BENCHMARKS.md, the decode attention kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core.block_manager import PADDING_SLOT
from ..core.kv_cache import PagedKVCache
from .kernels import load_kernels

IMPLEMENTATION = "engine_paged"


@dataclass
class PromptChunk:
    start: int  # where the chunk's tokens begin in the step's flat row
    end: int
    kv_index: torch.Tensor  # cache slots of the sequence's tokens so far, this chunk included
    # Set by group_chunks for a chunk attended alone; None when the chunk is its whole context (plain causal).
    causal_mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def context(self) -> int:
        """Positions the chunk's last token sees: the sequence's tokens so far, the chunk's own included."""
        return self.kv_index.numel()


@dataclass
class ChunkGroup:
    """Prompt chunks attended in one padded call: one call costs less than several small ones while
    padding stays small (GROUP_PADDING_LIMIT)."""

    token_index: torch.Tensor  # [tokens]: where the group's tokens lie in the step's flat row
    padded_index: torch.Tensor  # [tokens]: where each lies in the padded [chunks * longest chunk] queries
    kv_index: torch.Tensor  # [chunks, longest context]: each chunk's cache slots, padded
    mask: torch.Tensor  # [chunks, 1, longest chunk, longest context]: causal, within each chunk's context
    longest_chunk: int


# A group's padded area (chunks x longest chunk x longest context) may be at most this much above
# the chunks' own: past it the padding costs more than separate calls save.
GROUP_PADDING_LIMIT = 1.5


def group_chunks(chunks: list[PromptChunk], device: torch.device) -> tuple[list[PromptChunk], list[ChunkGroup]]:
    """The chunks left to attend one by one, and groups of the others. Chunks come ordered by size,
    so neighbours make the groups."""
    single: list[PromptChunk] = []
    groups: list[ChunkGroup] = []
    members: list[PromptChunk] = []

    def close() -> None:
        if len(members) == 1:
            single.append(with_causal_mask(members[0], device))
        elif members:
            groups.append(chunk_group(members, device))
        members.clear()

    for chunk in chunks:
        candidate = [*members, chunk]
        if members and padded_area(candidate) > GROUP_PADDING_LIMIT * sum(c.size * c.context for c in candidate):
            close()
        members.append(chunk)
    close()
    return single, groups


def padded_area(chunks: list[PromptChunk]) -> int:
    return len(chunks) * max(chunk.size for chunk in chunks) * max(chunk.context for chunk in chunks)


def causal_mask(chunk: PromptChunk, device: torch.device) -> torch.Tensor:
    """[chunk, context]: what each of the chunk's tokens sees; the chunk ends its context."""
    positions = torch.arange(chunk.context - chunk.size, chunk.context, device=device)[:, None]
    return torch.arange(chunk.context, device=device)[None, :] <= positions


def with_causal_mask(chunk: PromptChunk, device: torch.device) -> PromptChunk:
    if chunk.size == chunk.context:
        return chunk
    return replace(chunk, causal_mask=causal_mask(chunk, device))


def chunk_group(chunks: list[PromptChunk], device: torch.device) -> ChunkGroup:
    longest_chunk = max(chunk.size for chunk in chunks)
    longest_context = max(chunk.context for chunk in chunks)
    kv_index = torch.full((len(chunks), longest_context), PADDING_SLOT, dtype=torch.long, device=device)
    mask = torch.zeros(len(chunks), 1, longest_chunk, longest_context, dtype=torch.bool, device=device)
    mask[:, :, :, 0] = True  # padded query rows see one slot, so their (discarded) output is not NaN
    token_index, padded_index = [], []
    for row, chunk in enumerate(chunks):
        kv_index[row, : chunk.context] = chunk.kv_index
        mask[row, 0, : chunk.size, : chunk.context] = causal_mask(chunk, device)
        token_index += range(chunk.start, chunk.end)
        padded_index += range(row * longest_chunk, row * longest_chunk + chunk.size)
    return ChunkGroup(
        token_index=torch.tensor(token_index, device=device),
        padded_index=torch.tensor(padded_index, device=device),
        kv_index=kv_index,
        mask=mask,
        longest_chunk=longest_chunk,
    )


@dataclass
class StepPlan:
    """Where every token of one batch step reads and writes in the paged cache."""

    cache: PagedKVCache
    write_index: torch.Tensor  # [tokens]: the cache slot of each new token
    decode_count: int  # the first `decode_count` tokens are one per decoding sequence
    decode_kv_index: torch.Tensor | None  # [decoders, longest]: their cache slots, padded
    decode_lengths: torch.Tensor | None  # [decoders]: the slots of each that hold its tokens
    chunks: list[PromptChunk]  # attended one by one
    chunk_groups: list[ChunkGroup]

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[decoders, 1, 1, longest]: True where a slot is the sequence's. Only the SDPA path reads it
        (the kernel takes the lengths), so it is built on its first read, once a step."""
        positions = torch.arange(self.decode_kv_index.shape[1], device=self.decode_lengths.device)
        return (positions[None, :] < self.decode_lengths[:, None])[:, None, None, :]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    engine_step: StepPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if engine_step is None:  # a plain transformers call (generate): behave as sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    # transformers passes [1, heads, tokens, head_dim]; attend takes [tokens, heads, head_dim]
    queries, keys, values = (states[0].transpose(0, 1) for states in (query, key, value))
    return attend(engine_step, module.layer_idx, queries, keys, values, scaling).unsqueeze(0), None


def attend(
    plan: StepPlan,
    layer: int,
    queries: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Writes the step's new keys and values ([tokens, kv_heads, head_dim]) into the layer's cache,
    then attends: [tokens, heads, head_dim] from queries of that shape."""
    keys, values = plan.cache.keys[layer], plan.cache.values[layer]
    keys.index_copy_(0, plan.write_index, new_keys)
    values.index_copy_(0, plan.write_index, new_values)
    output = torch.empty(queries.shape, dtype=queries.dtype, device=queries.device)
    if plan.decode_count:
        output[: plan.decode_count] = decode_attention(queries[: plan.decode_count], keys, values, plan, scaling)
    for chunk in plan.chunks:
        q = queries[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, chunk, head_dim]
        if chunk.causal_mask is None:
            k = new_keys[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            v = new_values[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k = keys.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)
            v = values.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=chunk.causal_mask, scale=scaling, enable_gqa=True
            )
        output[chunk.start : chunk.end] = attended[0].transpose(0, 1)
    for group in plan.chunk_groups:
        output.index_copy_(0, group.token_index, grouped_chunk_attention(queries, keys, values, group, scaling))
    return output


def grouped_chunk_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: ChunkGroup, scaling: float | None
) -> torch.Tensor:
    """[the group's tokens, heads, head_dim], in the order of group.token_index."""
    chunks, longest_chunk = group.kv_index.shape[0], group.longest_chunk
    heads = queries.shape[1:]
    padded = queries.new_zeros(chunks * longest_chunk, *heads)
    padded.index_copy_(0, group.padded_index, queries.index_select(0, group.token_index))
    q = padded.view(chunks, longest_chunk, *heads).transpose(1, 2)  # [chunks, heads, longest chunk, head_dim]
    shape = (*group.kv_index.shape, *keys.shape[1:])
    k = keys.index_select(0, group.kv_index.flatten()).view(shape).transpose(1, 2)  # [chunks, kv_heads, context, head_dim]
    v = values.index_select(0, group.kv_index.flatten()).view(shape).transpose(1, 2)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=True)
    return attended.transpose(1, 2).reshape(chunks * longest_chunk, *heads).index_select(0, group.padded_index)


def decode_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float | None
) -> torch.Tensor:
    """[decoders, heads, head_dim]: each decoding token against its own sequence's cache slots."""
    scale = scaling if scaling is not None else queries.shape[-1] ** -0.5
    kernels = load_kernels() if kernel_serves(keys) else None
    if kernels is not None:
        return kernels.paged_decode_attention(queries.contiguous(), keys, values, plan.decode_kv_index, plan.decode_lengths, scale)
    q = queries.unsqueeze(2)  # [decoders, heads, 1, head_dim]
    shape = (*plan.decode_kv_index.shape, *keys.shape[1:])  # index_select is ~3x faster than indexing
    k = keys.index_select(0, plan.decode_kv_index.flatten()).view(shape).transpose(1, 2)  # [decoders, kv_heads, longest, head_dim]
    v = values.index_select(0, plan.decode_kv_index.flatten()).view(shape).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.decode_mask, scale=scale, enable_gqa=True)[:, :, 0, :]


def kernel_serves(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype == torch.float32 and cache.shape[-1] % 8 == 0


def install(model: torch.nn.Module) -> bool:
    """Switches the model to paged attention; False when its attention does not go through the interface.
    Builds the CPU kernels now for an fp32 CPU model, not in its first batch step."""
    parameter = next(model.parameters())
    if parameter.device.type == "cpu" and parameter.dtype == torch.float32:
        load_kernels()
    AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    model.set_attn_implementation(IMPLEMENTATION)
    return model.config._attn_implementation == IMPLEMENTATION
