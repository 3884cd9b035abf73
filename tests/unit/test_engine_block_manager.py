"""The block manager: block tables, the prefix cache and its eviction, on block ids alone (no torch)."""

from __future__ import annotations

import pytest

from engine.core.block_manager import BLOCK_SIZE, PADDING_BLOCK, BlockManager, CacheFull, block_hashes
from engine.core.sequence import BlockCopy


def blocks_for(prompt: list[int], extra_tokens: int = 0) -> int:
    return -(-(len(prompt) + extra_tokens) // BLOCK_SIZE)


def computed_prompt(manager: BlockManager, prompt: list[int], hashes: list[int] | None = None) -> list[int]:
    """Claims blocks for the prompt, indexes its full blocks as a finished prefill does, and lets it go."""
    hashes = block_hashes(prompt) if hashes is None else hashes
    claim = manager.claim(prompt, hashes, blocks_for(prompt))
    if claim.copy is not None:
        manager.release([claim.copy.source])
    manager.remember_prompt(claim.blocks, hashes, prompt)
    manager.release(claim.blocks)
    return claim.blocks


def test_hashes_cover_full_blocks_and_depend_on_everything_before():
    tokens = list(range(40))
    hashes = block_hashes(tokens)
    assert len(hashes) == 40 // BLOCK_SIZE
    changed_first = block_hashes([99] + tokens[1:])
    assert all(a != b for a, b in zip(hashes, changed_first))  # a change early changes every later block
    assert block_hashes(tokens[:32]) == hashes[:2]


def test_the_padding_block_is_never_handed_out():
    manager = BlockManager(4)
    assert PADDING_BLOCK not in manager.allocate(3)
    with pytest.raises(CacheFull):
        manager.allocate(1)


def test_released_blocks_return_and_remembered_ones_are_reused_then_evicted():
    manager = BlockManager(5)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    first = computed_prompt(manager, prompt)
    assert manager.available == 4  # cached but unused blocks count as available

    claim = manager.claim(prompt, block_hashes(prompt), 3)
    assert claim.blocks[:2] == first[:2] and claim.cached_tokens == 2 * BLOCK_SIZE and claim.copy is None
    assert manager.prefix_hits == 2
    manager.release(claim.blocks)

    manager.allocate(4)  # needs every block: the cached ones are evicted
    assert manager.cached == {} and manager.tokens_of_block == {} and manager.children == {}


def test_a_block_in_use_is_never_evicted():
    manager = BlockManager(3)
    prompt = list(range(BLOCK_SIZE + 1))
    claim = manager.claim(prompt, block_hashes(prompt), 2)
    manager.remember_prompt(claim.blocks, block_hashes(prompt), prompt)
    with pytest.raises(CacheFull):
        manager.allocate(1)


def test_a_hit_needs_the_prompts_own_tokens_so_a_hash_collision_is_a_miss():
    manager = BlockManager(8)
    forced = [7, 8]  # both prompts' blocks made to hash alike, as a collision would
    first = list(range(2 * BLOCK_SIZE + 1))
    computed_prompt(manager, first, forced)
    second = list(range(100, 100 + 2 * BLOCK_SIZE + 1))

    claim = manager.claim(second, forced, blocks_for(second))

    assert claim.cached_tokens == 0 and claim.copy is None
    assert manager.prefix_hits == 0
    assert sum(manager.references) == len(claim.blocks)  # nothing of the first prompt's is held


def test_a_block_hit_needs_the_block_before_it_to_be_the_one_matched():
    manager = BlockManager(16)
    start_a, start_b = list(range(BLOCK_SIZE)), list(range(500, 500 + BLOCK_SIZE))
    middle, other_middle = list(range(100, 100 + BLOCK_SIZE)), list(range(700, 700 + BLOCK_SIZE))
    computed_prompt(manager, start_a + middle + [1])
    computed_prompt(manager, start_b + other_middle + [1])
    # `middle` after `start_b`, with a hash that collides with `middle` after `start_a`: the cached
    # block holds the same tokens, but its keys and values were computed after other ones.
    prompt = start_b + middle + [1]
    hashes = [block_hashes(start_b)[0], block_hashes(start_a + middle)[1]]

    claim = manager.claim(prompt, hashes, blocks_for(prompt))

    assert claim.cached_tokens == BLOCK_SIZE  # start_b's block only


def test_a_prefix_that_ends_inside_a_block_is_copied_into_the_new_prompts_own_block():
    manager = BlockManager(8)
    shared = list(range(100, 100 + BLOCK_SIZE + 5))  # one whole block, then 5 tokens into the next
    earlier = computed_prompt(manager, shared + list(range(200, 220)))

    prompt = shared + list(range(300, 320))
    claim = manager.claim(prompt, block_hashes(prompt), 3)

    assert claim.cached_tokens == BLOCK_SIZE + 5
    assert claim.blocks[0] == earlier[0]  # the whole block is shared, not copied
    assert claim.blocks[1] != earlier[1]  # the partly shared one is the prompt's own...
    assert claim.copy == BlockCopy(source=earlier[1], target=claim.blocks[1], tokens=5)  # ...with a copy to make
    assert manager.references[earlier[1]] == 1  # the source is held until the copy is made
    manager.release([claim.copy.source])
    assert manager.references[earlier[1]] == 0


def test_the_last_prompt_token_is_never_taken_from_the_cache():
    manager = BlockManager(8)
    prompt = list(range(2 * BLOCK_SIZE))
    computed_prompt(manager, prompt + [999])
    claim = manager.claim(prompt, block_hashes(prompt), 3)
    assert claim.cached_tokens == len(prompt) - 1  # its logits give the first new token


def test_no_shared_tokens_means_nothing_is_copied_or_held():
    manager = BlockManager(8)
    computed_prompt(manager, list(range(2 * BLOCK_SIZE)))
    prompt = list(range(500, 500 + BLOCK_SIZE + 3))
    claim = manager.claim(prompt, block_hashes(prompt), 2)
    assert claim.cached_tokens == 0 and claim.copy is None
    assert sum(manager.references) == len(claim.blocks)


def test_a_claim_the_pool_cannot_hold_holds_nothing():
    manager = BlockManager(4)
    shared = list(range(BLOCK_SIZE + 5))
    computed_prompt(manager, shared + [7] * 11)  # two cached blocks: a whole one, a partly shared one
    prompt = shared + [8] * 11
    with pytest.raises(CacheFull):
        manager.claim(prompt, block_hashes(prompt), 5)
    assert sum(manager.references) == 0 and manager.available == 3


def test_an_evicted_block_takes_the_blocks_after_it_out_of_the_index():
    manager = BlockManager(4)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    parent, child, _ = computed_prompt(manager, prompt)
    manager.allocate(1)  # the free block
    manager.allocate(1)  # evicts the least recently used cached block: the first, and its child with it
    assert parent not in manager.hash_of_block and child not in manager.hash_of_block
    assert manager.children == {} and manager.parent_of_block == {}
    assert manager.available == 1  # the child went back to the free list


def test_a_prefix_computed_twice_is_indexed_once_and_the_rest_of_the_second_is_found():
    manager = BlockManager(16)
    system = list(range(BLOCK_SIZE))  # both prompts' first block
    first, second = system + list(range(100, 117)), system + list(range(200, 217))
    hashes = {tuple(p): block_hashes(p) for p in (first, second)}
    # Admitted together, before either is indexed: each computes the shared block in a block of its own.
    claims = [manager.claim(p, hashes[tuple(p)], blocks_for(p)) for p in (first, second)]
    for prompt, claim in zip((first, second), claims):
        manager.remember_prompt(claim.blocks, hashes[tuple(prompt)], prompt)
        manager.release(claim.blocks)

    again = manager.claim(second, hashes[tuple(second)], blocks_for(second))

    assert again.cached_tokens == 2 * BLOCK_SIZE  # the first prompt's first block, then the second's own
    assert again.blocks[:2] == [claims[0].blocks[0], claims[1].blocks[1]]
