"""A paged KV cache: one pool of fixed-size token blocks per layer, shared by every running sequence.

Sequences own lists of blocks (block tables), so a batch never pads its cache to the longest
sequence, and a finished sequence gives its blocks back at once. Full blocks of prompts are also
indexed by a hash of every token up to and including them (the prefix cache): a later prompt that
starts with the same tokens (the chat template's system prompt, a repeated instruction) reuses
those blocks instead of computing them again. Where a shared prefix ends inside a block, the
tokens it shares with a cached block are copied into the new prompt's own block, so a prompt
recomputes only what is its own, not up to a block's worth more. Cached blocks that no sequence
uses are evicted, least recently used first, when the pool runs out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 16
# Never handed out: batched attention pads with its slots, so they must hold finite values.
PADDING_BLOCK = 0
PADDING_SLOT = PADDING_BLOCK * BLOCK_SIZE  # a slot no sequence owns, holding finite values


def block_hashes(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """A hash per full block, each covering every token from the start of the prompt."""
    hashes, previous = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        hashes.append(previous)
    return hashes


def shared_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens the two have in common."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


class CacheFull(Exception):
    """No free block: the sequence waits until running ones finish."""


@dataclass
class BlockAllocator:
    num_blocks: int
    block_size: int = BLOCK_SIZE
    references: list[int] = field(init=False)
    free: list[int] = field(init=False)
    cached: OrderedDict[int, int] = field(init=False, default_factory=OrderedDict)  # hash -> block, LRU first
    hash_of_block: dict[int, int] = field(init=False, default_factory=dict)
    # parent's hash (0 before the first block) -> {cached block: its tokens}: where a prompt whose next
    # block is not cached whole looks for the cached block that shares most of its leading tokens
    children: dict[int, dict[int, tuple[int, ...]]] = field(init=False, default_factory=dict)
    parent_of_block: dict[int, int] = field(init=False, default_factory=dict)
    evictable: int = 0  # cached blocks no sequence uses; kept as a count so other threads can read it
    prefix_hits: int = 0
    prefix_queries: int = 0

    def __post_init__(self) -> None:
        self.references = [0] * self.num_blocks
        self.free = list(range(self.num_blocks - 1, PADDING_BLOCK, -1))

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones and cached ones nobody uses."""
        return len(self.free) + self.evictable

    def allocate(self, count: int) -> list[int]:
        if count > self.available:
            raise CacheFull(f"{count} blocks wanted, {self.available} available")
        blocks = []
        for _ in range(count):
            block = self.free.pop() if self.free else self._evict_one()
            self.references[block] = 1
            blocks.append(block)
        return blocks

    def _evict_one(self) -> int:
        for block_hash, block in self.cached.items():
            if self.references[block] == 0:
                del self.cached[block_hash]
                del self.hash_of_block[block]
                parent = self.parent_of_block.pop(block)
                del self.children[parent][block]
                if not self.children[parent]:
                    del self.children[parent]
                self.evictable -= 1
                return block
        raise CacheFull("no evictable block")

    def _reference(self, block: int) -> None:
        self.cached.move_to_end(self.hash_of_block[block])
        if self.references[block] == 0:
            self.evictable -= 1
        self.references[block] += 1

    def match_prefix(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest cached prefix, each now referenced by the caller."""
        matched = []
        for block_hash in hashes:
            block = self.cached.get(block_hash)
            if block is None:
                break
            self._reference(block)
            matched.append(block)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(matched)
        return matched

    def match_partial(self, parent_hash: int, tokens: Sequence[int]) -> tuple[int, int]:
        """The cached block after `parent_hash` that starts with the most of `tokens`, and how many it
        shares (0: none, and nothing is referenced); a block it returns is referenced by the caller."""
        best_block, best_length = PADDING_BLOCK, 0
        for block, block_tokens in self.children.get(parent_hash, {}).items():
            length = shared_length(block_tokens, tokens)
            if length > best_length:
                best_block, best_length = block, length
                if length == len(tokens):
                    break
        if best_length:
            self._reference(best_block)
        return best_block, best_length

    def remember(self, block: int, block_hash: int, parent_hash: int, tokens: tuple[int, ...]) -> None:
        """Indexes a block that holds a full prompt block, unless the same content is indexed already."""
        if block_hash not in self.cached and block not in self.hash_of_block:
            self.cached[block_hash] = block
            self.hash_of_block[block] = block_hash
            self.children.setdefault(parent_hash, {})[block] = tokens
            self.parent_of_block[block] = parent_hash

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.references[block] -= 1
            if self.references[block] == 0:
                if block in self.hash_of_block:
                    self.evictable += 1
                else:
                    self.free.append(block)


class PagedKVCache:
    """Per layer, keys and values of every block: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, dtype: torch.dtype, device: str) -> None:
        slots = num_blocks * BLOCK_SIZE
        # Zeroed, so every page is resident from the load on: the memory is reserved when the load is
        # checked, not taken later under traffic as the prefix cache fills the pool (which read as a
        # leak in the soak: +8% RSS over 2,000 requests). The padding block must hold finite values too.
        # One allocation for all layers' keys and one for their values: glibc maps anything that large
        # on its own, so an unload returns it to the OS whole. Per-layer tensors of a few MB can land in
        # the heap once glibc raises its mapping threshold, and stay resident after the unload.
        self._pools = [torch.zeros(layers, slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
        self.keys, self.values = (list(pool.unbind(0)) for pool in self._pools)
        self.allocator = BlockAllocator(num_blocks)

    def claim(self, prompt_ids: list[int], hashes: list[int], block_count: int) -> tuple[list[int], int]:
        """`block_count` blocks for a sequence with this prompt, and how many of its first tokens
        already hold their keys and values: cached whole blocks, then as many of the next block's
        tokens as a cached block shares, copied into the sequence's own block. Raises CacheFull
        (holding nothing) when the pool has too few blocks left."""
        allocator = self.allocator
        computable = len(prompt_ids) - 1  # the last prompt token is always computed: its logits give the first token
        matched = allocator.match_prefix(hashes[: computable // BLOCK_SIZE])
        start = len(matched) * BLOCK_SIZE
        parent_hash = hashes[len(matched) - 1] if matched else 0
        source, shared = allocator.match_partial(parent_hash, prompt_ids[start : min(start + BLOCK_SIZE, computable)])
        try:
            fresh = allocator.allocate(block_count - len(matched))
        except CacheFull:
            allocator.release(matched + [source] * bool(shared))
            raise
        if shared:
            target, origin = fresh[0] * BLOCK_SIZE, source * BLOCK_SIZE
            for pool in self._pools:
                pool[:, target : target + shared] = pool[:, origin : origin + shared]
            allocator.release([source])
        return matched + fresh, start + shared

    def remember_prompt(self, blocks: list[int], hashes: list[int], prompt_ids: list[int]) -> None:
        """Indexes the sequence's full prompt blocks, once their keys and values are computed."""
        for index, (block, block_hash) in enumerate(zip(blocks, hashes)):
            tokens = tuple(prompt_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
            self.allocator.remember(block, block_hash, hashes[index - 1] if index else 0, tokens)

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def size_bytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self._pools)
