"""The block allocator and prefix index of the paged KV cache."""

from __future__ import annotations

import pytest

from runners.kv_cache import BLOCK_SIZE, PADDING_BLOCK, BlockAllocator, CacheFull, block_hashes


def test_hashes_cover_full_blocks_and_depend_on_everything_before():
    tokens = list(range(40))
    hashes = block_hashes(tokens)
    assert len(hashes) == 40 // BLOCK_SIZE
    changed_first = block_hashes([99] + tokens[1:])
    assert all(a != b for a, b in zip(hashes, changed_first))  # a change early changes every later block
    assert block_hashes(tokens[:32]) == hashes[:2]


def test_the_padding_block_is_never_handed_out():
    allocator = BlockAllocator(4)
    assert PADDING_BLOCK not in allocator.allocate(3)
    with pytest.raises(CacheFull):
        allocator.allocate(1)


def test_released_blocks_return_and_remembered_ones_are_reused_then_evicted():
    allocator = BlockAllocator(5)
    first = allocator.allocate(2)
    hashes = block_hashes(list(range(2 * BLOCK_SIZE)))
    for block, block_hash in zip(first, hashes):
        allocator.remember(block, block_hash)
    allocator.release(first)
    assert allocator.available == 4  # cached but unused blocks count as available

    matched = allocator.match_prefix(hashes)
    assert matched == first and allocator.prefix_hits == 2
    allocator.release(matched)

    allocator.allocate(4)  # needs every block: the cached ones are evicted
    assert allocator.match_prefix(hashes) == []


def test_a_block_in_use_is_never_evicted():
    allocator = BlockAllocator(3)
    (block,) = allocator.allocate(1)
    allocator.remember(block, 123)
    allocator.allocate(1)
    with pytest.raises(CacheFull):
        allocator.allocate(1)
