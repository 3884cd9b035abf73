"""Which cache blocks each sequence owns, and the prefix cache: pure bookkeeping over block ids.

The KV cache (kv_cache.py) is one pool of fixed-size token blocks per layer. A sequence owns a list
of blocks (its block table), so a batch never pads its cache to the longest sequence and a finished
sequence gives its blocks back at once.

Full prompt blocks are also indexed (the prefix cache): a later prompt that starts with the same
tokens (the chat template's system prompt, a repeated instruction) reuses those blocks instead of
computing them again. The index is keyed by a hash of every token up to and including the block,
but a hit is taken only when the cached block holds the prompt's very tokens and follows the block
matched before it, so a hash collision costs a miss, never another prompt's keys and values. Where
a shared prefix ends inside a block, the tokens it shares with a cached block are copied into the
prompt's own block (a BlockCopy the model runner carries out), so a prompt recomputes only what is
its own. Cached blocks no sequence uses are evicted, least recently used first, when the pool runs
out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .sequence import BlockCopy

BLOCK_SIZE = 16
# Never handed out: batched attention pads with its slots, so they must hold finite values.
PADDING_BLOCK = 0
PADDING_SLOT = PADDING_BLOCK * BLOCK_SIZE  # a slot no sequence owns, holding finite values
ROOT = -1  # the parent of a prompt's first block


def block_hashes(token_ids: Sequence[int]) -> list[int]:
    """A hash per full block, each covering every token from the start of the prompt."""
    hashes, previous = [], 0
    for start in range(0, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        previous = hash((previous, tuple(token_ids[start : start + BLOCK_SIZE])))
        hashes.append(previous)
    return hashes


def block_tokens(token_ids: Sequence[int], index: int) -> tuple[int, ...]:
    return tuple(token_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])


def shared_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens the two have in common."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


class CacheFull(Exception):
    """No free block: the sequence waits until running ones finish."""


@dataclass(frozen=True)
class Claim:
    blocks: list[int]  # the sequence's block table
    cached_tokens: int  # its first tokens whose keys and values are already there (or come with `copy`)
    copy: BlockCopy | None  # its source block stays referenced until released after the copy


class BlockManager:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.references = [0] * num_blocks
        self.free = list(range(num_blocks - 1, PADDING_BLOCK, -1))
        self.cached: OrderedDict[int, int] = OrderedDict()  # hash -> block, least recently used first
        self.hash_of_block: dict[int, int] = {}
        self.tokens_of_block: dict[int, tuple[int, ...]] = {}
        self.parent_of_block: dict[int, int] = {}  # the cached block before it in its prompt, or ROOT
        self.children: dict[int, set[int]] = {}  # block (or ROOT) -> cached blocks that follow it
        self.evictable = 0  # cached blocks no sequence uses; kept as a count so other threads can read it
        self.prefix_hits = 0
        self.prefix_queries = 0

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

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.references[block] -= 1
            if self.references[block] == 0:
                if block in self.hash_of_block:
                    self.evictable += 1
                else:
                    self.free.append(block)

    def claim(
        self, prompt_ids: Sequence[int], hashes: list[int], block_count: int, computed_from: int | None = None
    ) -> Claim:
        """`block_count` blocks for a sequence with this prompt: the cached blocks of its longest cached
        prefix, then fresh ones, the first of which gets a copy of the tokens a cached block shares with
        the prompt past that prefix. Tokens from `computed_from` on are computed whatever the cache holds
        (their logits are wanted). Raises CacheFull (holding nothing) when the pool has too few blocks."""
        # The last prompt token is always computed: its logits give the first token.
        computable = len(prompt_ids) - 1 if computed_from is None else min(len(prompt_ids) - 1, computed_from)
        matched = self._match_prefix(prompt_ids, hashes[: computable // BLOCK_SIZE])
        start = len(matched) * BLOCK_SIZE
        source, shared = self._match_partial(matched[-1] if matched else ROOT, prompt_ids[start : min(start + BLOCK_SIZE, computable)])
        try:
            fresh = self.allocate(block_count - len(matched))
        except CacheFull:
            self.release(matched + [source] * bool(shared))
            raise
        copy = BlockCopy(source, fresh[0], shared) if shared else None
        return Claim(matched + fresh, start + shared, copy)

    def remember_prompt(self, blocks: list[int], hashes: list[int], prompt_ids: Sequence[int]) -> None:
        """Indexes the sequence's full prompt blocks, once their keys and values are computed. A block
        whose content is cached already (another sequence computed the same prefix) is not indexed
        twice: the cached one stands for it as the parent of the next."""
        parent = ROOT
        for index, (block, block_hash) in enumerate(zip(blocks, hashes)):
            tokens = block_tokens(prompt_ids, index)
            indexed = self.cached.get(block_hash)
            if indexed is None and block not in self.hash_of_block:
                self._index(block, block_hash, parent, tokens)
                parent = block
            elif indexed is not None and self._holds(indexed, parent, tokens):
                parent = indexed
            else:  # a hash collision: nothing after it could be found from the root
                return

    def cached_tokens(self, prompt_ids: Sequence[int], hashes: list[int]) -> int:
        """How many of the prompt's first tokens the cache holds now, in whole blocks. A probe: it
        references nothing and counts in no statistic."""
        parent = ROOT
        for index, block_hash in enumerate(hashes):
            block = self.cached.get(block_hash)
            if block is None or not self._holds(block, parent, block_tokens(prompt_ids, index)):
                return index * BLOCK_SIZE
            parent = block
        return len(hashes) * BLOCK_SIZE

    def _holds(self, block: int, parent: int, tokens: tuple[int, ...]) -> bool:
        """Whether the cached block holds these tokens after that parent: then its keys and values are
        the ones the prompt would compute."""
        return self.parent_of_block[block] == parent and self.tokens_of_block[block] == tokens

    def _match_prefix(self, prompt_ids: Sequence[int], hashes: list[int]) -> list[int]:
        """The cached blocks of the longest cached prefix, each now referenced by the caller."""
        matched: list[int] = []
        for index, block_hash in enumerate(hashes):
            block = self.cached.get(block_hash)
            if block is None or not self._holds(block, matched[-1] if matched else ROOT, block_tokens(prompt_ids, index)):
                break
            self._reference(block)
            matched.append(block)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(matched)
        return matched

    def _match_partial(self, parent: int, tokens: Sequence[int]) -> tuple[int, int]:
        """The cached block after `parent` that starts with the most of `tokens`, and how many it
        shares (0: none, and nothing is referenced); a block it returns is referenced by the caller."""
        best_block, best_length = PADDING_BLOCK, 0
        for block in self.children.get(parent, ()):
            length = shared_length(self.tokens_of_block[block], tokens)
            if length > best_length:
                best_block, best_length = block, length
                if length == len(tokens):
                    break
        if best_length:
            self._reference(best_block)
        return best_block, best_length

    def _reference(self, block: int) -> None:
        self.cached.move_to_end(self.hash_of_block[block])
        if self.references[block] == 0:
            self.evictable -= 1
        self.references[block] += 1

    def _index(self, block: int, block_hash: int, parent: int, tokens: tuple[int, ...]) -> None:
        self.cached[block_hash] = block
        self.hash_of_block[block] = block_hash
        self.tokens_of_block[block] = tokens
        self.parent_of_block[block] = parent
        self.children.setdefault(parent, set()).add(block)

    def _evict_one(self) -> int:
        for block in self.cached.values():
            if self.references[block] == 0:
                self._forget(block)
                return self.free.pop()
        raise CacheFull("no evictable block")

    def _forget(self, block: int) -> None:
        """Takes the block out of the index, and with it every block that follows it: once the block is
        reused for other tokens, what was computed after it no longer follows its content."""
        parent = self.parent_of_block[block]
        self.children[parent].discard(block)
        if not self.children[parent]:
            del self.children[parent]
        forgotten = [block]
        while forgotten:
            block = forgotten.pop()
            forgotten += self.children.pop(block, ())
            del self.cached[self.hash_of_block.pop(block)]
            del self.tokens_of_block[block]
            del self.parent_of_block[block]
            if self.references[block] == 0:
                self.evictable -= 1
                self.free.append(block)
