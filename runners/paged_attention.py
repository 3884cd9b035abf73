"""Attention over the paged KV cache, plugged into transformers' attention interface.

A batch step feeds the model one flat row of tokens: first one token per decoding sequence, then a
chunk of prompt tokens per prefilling sequence. Nothing is padded. Each layer writes the new keys
and values into their sequences' blocks, then attends: all decoding tokens in one batched call
(each against its own sequence's cache), and each prompt chunk in its own causal call. Models
keep their own projections, rotary embeddings and MLPs; only attention is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_cache import PagedKVCache

IMPLEMENTATION = "engine_paged"


@dataclass
class PromptChunk:
    start: int  # where the chunk's tokens begin in the step's flat row
    end: int
    kv_index: torch.Tensor  # cache slots of the sequence's tokens so far, this chunk included
    causal_mask: torch.Tensor | None  # None when the chunk is the whole context: plain causal attention


@dataclass
class StepPlan:
    """Where every token of one batch step reads and writes in the paged cache."""

    cache: PagedKVCache
    write_index: torch.Tensor  # [tokens]: the cache slot of each new token
    decode_count: int  # the first `decode_count` tokens are one per decoding sequence
    decode_kv_index: torch.Tensor | None  # [decoders, longest]: their cache slots, padded
    decode_mask: torch.Tensor | None  # [decoders, 1, 1, longest]: True where a slot is the sequence's
    chunks: list[PromptChunk]


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
    plan = engine_step
    layer = module.layer_idx
    keys, values = plan.cache.keys[layer], plan.cache.values[layer]
    new_keys = key[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    new_values = value[0].transpose(0, 1)
    keys.index_copy_(0, plan.write_index, new_keys)
    values.index_copy_(0, plan.write_index, new_values)

    queries = query[0].transpose(0, 1)  # [tokens, heads, head_dim]
    output = torch.empty_like(queries)
    if plan.decode_count:
        count = plan.decode_count
        q = queries[:count].unsqueeze(2)  # [decoders, heads, 1, head_dim]
        shape = (*plan.decode_kv_index.shape, *keys.shape[1:])  # index_select is ~3x faster than indexing
        k = keys.index_select(0, plan.decode_kv_index.flatten()).view(shape).transpose(1, 2)  # [decoders, kv_heads, longest, head_dim]
        v = values.index_select(0, plan.decode_kv_index.flatten()).view(shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.decode_mask, scale=scaling, enable_gqa=True)
        output[:count] = attended[:, :, 0, :]
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
    return output.unsqueeze(0), None


def install(model: torch.nn.Module) -> bool:
    """Switches the model to paged attention; False when its attention does not go through the interface."""
    AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    model.set_attn_implementation(IMPLEMENTATION)
    return model.config._attn_implementation == IMPLEMENTATION
