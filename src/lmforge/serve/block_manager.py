"""The KV-cache allocator: fixed-size blocks, per-sequence block tables, prefix sharing.

The cache holds `num_blocks * block_size` token slots; block b owns slots [b*bs, (b+1)*bs).
A sequence's block table maps its token position p to slot table[p // bs] * bs + p % bs.

Prefix sharing: once a block is full its contents are fixed, so it is registered under a hash of
(the previous block's hash, its token ids). A new request whose prompt starts with the same
tokens reuses those blocks (reference-counted) instead of recomputing them. A freed block keeps
its registration and sits in an LRU free list: it can still be revived by a later request until
the allocator hands it out for something else.
"""
from __future__ import annotations

from collections import OrderedDict

from lmforge.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one slot")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks   # (hash, tokens) when registered
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.prefix_hits = 0    # tokens served from the prefix cache, for metrics

    # --- counts ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation -----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # its old contents are about to be overwritten
            if self.by_hash.get(key[0]) == block:
                del self.by_hash[key[0]]
            self.block_key[block] = None
        self.ref_count[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def allocate_prefix(self, seq: Sequence) -> None:
        """Give a newly admitted sequence the cached blocks matching its prompt's beginning.

        At least one token is always left to compute: its logits start the generation."""
        if not self.prefix_caching or seq.block_table:
            return
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            block = self.by_hash.get(h)
            if block is None or self.block_key[block] != (h, tokens):
                break
            self._share(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = seq.num_cached_prompt = len(seq.block_table) * self.block_size
        self.prefix_hits += seq.num_computed

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold num_computed + num_new_tokens tokens; False if out of blocks."""
        need = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that became full (all their tokens computed) for prefix sharing."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.by_hash and self.block_key[block] is None:
                self.by_hash[h] = block
                self.block_key[block] = (h, tokens)

    def free_sequence(self, seq: Sequence) -> None:
        """Release a finished, cancelled or preempted sequence's blocks."""
        # Tail blocks go to the free list first so they are reused first: the prompt's head,
        # the part most likely shared by the next request, survives longest.
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
        if seq.spec is not None:  # whatever a draft model cached for it is gone with the blocks
            seq.spec.reset()
            seq.spec.draft_computed = 0

    def trim(self, seq: Sequence) -> None:
        """KV rollback: release the blocks past the sequence's tokens (slots that held rejected
        speculative tokens). Such blocks were never full of computed tokens, so never shared."""
        keep = self.blocks_for(seq.num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
