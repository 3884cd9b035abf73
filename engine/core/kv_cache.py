"""The paged KV cache's tensors: per layer, keys and values of every block's slots.

Which blocks a sequence owns is the block manager's business (block_manager.py); this holds the
numbers, and copies a cached block's tokens where the block manager says.
"""

from __future__ import annotations

import torch

from .block_manager import BLOCK_SIZE


class PagedKVCache:
    """Per layer, keys and values of every block: [num_blocks * BLOCK_SIZE, kv_heads, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, dtype: torch.dtype, device: str) -> None:
        slots = num_blocks * BLOCK_SIZE
        # Zeroed, so that every page is resident from the load on: the memory is reserved when the load
        # is checked, not taken later under traffic as the prefix cache fills the pool (RSS would creep
        # up and read as a leak). The padding block must hold finite values too.
        # One allocation for all layers' keys and one for their values: glibc maps anything that large
        # on its own, so an unload returns it to the OS whole, where per-layer tensors of a few MB can
        # land in the heap once glibc raises its mapping threshold, and stay resident after the unload.
        self._pools = [torch.zeros(layers, slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
        self.keys, self.values = (list(pool.unbind(0)) for pool in self._pools)
        self.num_blocks = num_blocks

    def copy_tokens(self, source: int, target: int, tokens: int) -> None:
        """The first `tokens` slots of block `source`, every layer's keys and values, into block `target`."""
        to, origin = target * BLOCK_SIZE, source * BLOCK_SIZE
        for pool in self._pools:
            pool[:, to : to + tokens] = pool[:, origin : origin + tokens]

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def size_bytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self._pools)
