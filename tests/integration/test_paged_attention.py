"""Prompt chunks attended in padded groups: which chunks are grouped, and the same attention as one by one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers.paged_attention import PromptChunk, group_chunks, grouped_chunk_attention

HEADS, KV_HEADS, DIM, SLOTS = 9, 3, 64, 800


def prompt_chunks(sizes_and_starts: list[tuple[int, int]], seed: int = 0) -> list[PromptChunk]:
    """Chunks laid one after another in a step's row; chunk i covers positions [start, start + size)."""
    generator = torch.Generator().manual_seed(seed)
    chunks, offset = [], 0
    for size, start in sizes_and_starts:
        kv_index = torch.randperm(SLOTS, generator=generator)[: start + size]
        chunks.append(PromptChunk(offset, offset + size, kv_index, None))
        offset += size
    return chunks


def one_by_one(queries, keys, values, chunk: PromptChunk, start: int) -> torch.Tensor:
    context = chunk.kv_index.numel()
    mask = torch.arange(context)[None, :] <= torch.arange(start, context)[:, None]
    q = queries[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
    k = keys[chunk.kv_index].transpose(0, 1).unsqueeze(0)
    v = values[chunk.kv_index].transpose(0, 1).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)[0].transpose(0, 1)


def test_chunks_of_similar_size_are_grouped_and_a_much_longer_one_is_left_alone():
    chunks = prompt_chunks([(16, 58), (18, 56), (20, 60), (70, 0), (1, 90)])

    single, groups = group_chunks(chunks, torch.device("cpu"))

    assert [group.kv_index.shape[0] for group in groups] == [3]
    assert [(chunk.start, chunk.end) for chunk in single] == [(54, 124), (124, 125)]


def test_grouped_attention_matches_each_chunk_attended_alone():
    sizes_and_starts = [(16, 58), (18, 56), (20, 60), (17, 0)]
    chunks = prompt_chunks(sizes_and_starts, seed=1)
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(chunks[-1].end, HEADS, DIM, generator=generator)
    keys, values = (torch.randn(SLOTS, KV_HEADS, DIM, generator=generator) for _ in range(2))

    single, groups = group_chunks(chunks, torch.device("cpu"))
    assert single == [] and len(groups) == 1
    group = groups[0]
    attended = torch.empty_like(queries)
    attended.index_copy_(0, group.token_index, grouped_chunk_attention(queries, keys, values, group, 0.125))

    for chunk, (_, start) in zip(chunks, sizes_and_starts):
        expected = one_by_one(queries, keys, values, chunk, start)
        torch.testing.assert_close(attended[chunk.start : chunk.end], expected, rtol=1e-5, atol=1e-5)
