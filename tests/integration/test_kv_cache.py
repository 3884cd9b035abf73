"""The block allocator and prefix index of the paged KV cache."""

from __future__ import annotations

import pytest

import torch

from runners.kv_cache import BLOCK_SIZE, PADDING_BLOCK, BlockAllocator, CacheFull, PagedKVCache, block_hashes


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
    for index, (block, block_hash) in enumerate(zip(first, hashes)):
        allocator.remember(block, block_hash, hashes[index - 1] if index else 0, (index,) * BLOCK_SIZE)
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
    allocator.remember(block, 123, 0, (1,) * BLOCK_SIZE)
    allocator.allocate(1)
    with pytest.raises(CacheFull):
        allocator.allocate(1)


def cache_with_blocks(num_blocks: int) -> PagedKVCache:
    return PagedKVCache(layers=2, kv_heads=1, head_dim=2, num_blocks=num_blocks, dtype=torch.float32, device="cpu")


def computed_prompt(cache: PagedKVCache, prompt: list[int]) -> list[int]:
    """Claims blocks for the prompt, fills each slot's keys and values with its token id (a stand-in
    for the model's), indexes the prompt's full blocks and lets the sequence go."""
    hashes = block_hashes(prompt)
    blocks, _ = cache.claim(prompt, hashes, -(-len(prompt) // BLOCK_SIZE))
    for position, token in enumerate(prompt):
        slot = blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
        for layer in range(2):
            cache.keys[layer][slot] = token
            cache.values[layer][slot] = -token
    cache.remember_prompt(blocks, hashes, prompt)
    cache.allocator.release(blocks)
    return blocks


def test_a_prefix_that_ends_inside_a_block_is_copied_into_the_new_prompts_own_block():
    cache = cache_with_blocks(8)
    shared = list(range(100, 100 + BLOCK_SIZE + 5))  # one whole block, then 5 tokens into the next
    earlier = computed_prompt(cache, shared + list(range(200, 220)))

    prompt = shared + list(range(300, 320))
    blocks, cached_tokens = cache.claim(prompt, block_hashes(prompt), 3)

    assert cached_tokens == BLOCK_SIZE + 5
    assert blocks[0] == earlier[0]  # the whole block is shared, not copied
    assert blocks[1] != earlier[1]  # the partly shared one is the prompt's own...
    copied = slice(blocks[1] * BLOCK_SIZE, blocks[1] * BLOCK_SIZE + 5)
    for layer in range(2):  # ...holding the earlier prompt's keys and values of the shared tokens
        assert cache.keys[layer][copied, 0, 0].tolist() == shared[BLOCK_SIZE:]
        assert cache.values[layer][copied, 0, 0].tolist() == [-token for token in shared[BLOCK_SIZE:]]
    assert cache.allocator.references[earlier[1]] == 0  # the copy's source is not held


def test_the_last_prompt_token_is_never_taken_from_the_cache():
    cache = cache_with_blocks(8)
    prompt = list(range(2 * BLOCK_SIZE))
    computed_prompt(cache, prompt + [999])
    _, cached_tokens = cache.claim(prompt, block_hashes(prompt), 3)
    assert cached_tokens == len(prompt) - 1  # its logits give the first new token


def test_no_shared_tokens_means_nothing_is_copied_or_held():
    cache = cache_with_blocks(8)
    computed_prompt(cache, list(range(2 * BLOCK_SIZE)))
    prompt = list(range(500, 500 + BLOCK_SIZE + 3))
    blocks, cached_tokens = cache.claim(prompt, block_hashes(prompt), 2)
    assert cached_tokens == 0
    assert sum(cache.allocator.references) == len(blocks)


def test_a_claim_the_pool_cannot_hold_holds_nothing():
    cache = cache_with_blocks(4)
    shared = list(range(BLOCK_SIZE + 5))
    computed_prompt(cache, shared + [7] * 11)  # two cached blocks: a whole one, a partly shared one
    prompt = shared + [8] * 11
    with pytest.raises(CacheFull):
        cache.claim(prompt, block_hashes(prompt), 5)
    assert sum(cache.allocator.references) == 0 and cache.allocator.available == 3


def test_an_evicted_block_is_no_longer_offered_for_partial_reuse():
    allocator = BlockAllocator(3)
    (block,) = allocator.allocate(1)
    allocator.remember(block, 123, 0, tuple(range(BLOCK_SIZE)))
    allocator.release([block])
    allocator.allocate(2)  # evicts it
    assert allocator.match_partial(0, list(range(5))) == (PADDING_BLOCK, 0)
    assert allocator.children == {} and allocator.parent_of_block == {}
