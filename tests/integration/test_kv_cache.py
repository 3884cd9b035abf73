"""The paged KV cache's tensors: copying a cached block's tokens where the block manager says."""

from __future__ import annotations

import torch

from engine.core.block_manager import BLOCK_SIZE
from engine.core.kv_cache import PagedKVCache


def test_a_copy_takes_the_first_tokens_of_every_layers_keys_and_values_and_nothing_else():
    cache = PagedKVCache(layers=2, kv_heads=1, head_dim=2, num_blocks=4, dtype=torch.float32, device="cpu")
    source, target = 1, 3
    for layer in range(2):
        slots = torch.arange(source * BLOCK_SIZE, (source + 1) * BLOCK_SIZE)
        cache.keys[layer][slots] = slots.float()[:, None, None] + layer
        cache.values[layer][slots] = -slots.float()[:, None, None] - layer

    cache.copy_tokens(source, target, 5)

    for layer in range(2):
        copied = cache.keys[layer][target * BLOCK_SIZE : (target + 1) * BLOCK_SIZE, 0, 0].tolist()
        expected = [float(source * BLOCK_SIZE + i + layer) for i in range(5)]
        assert copied == expected + [0.0] * (BLOCK_SIZE - 5)
        copied_values = cache.values[layer][target * BLOCK_SIZE : target * BLOCK_SIZE + 5, 0, 0].tolist()
        assert copied_values == [-value for value in expected]


def test_the_pools_are_allocated_whole_and_counted():
    cache = PagedKVCache(layers=3, kv_heads=2, head_dim=8, num_blocks=5, dtype=torch.float32, device="cpu")
    assert cache.size_bytes == 2 * 3 * 5 * BLOCK_SIZE * 2 * 8 * 4
    assert cache.size_bytes == PagedKVCache.bytes_per_token(3, 2, 8, torch.float32) * 5 * BLOCK_SIZE
    assert all(float(pool.abs().sum()) == 0.0 for pool in (*cache.keys, *cache.values))
