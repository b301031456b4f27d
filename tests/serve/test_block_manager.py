"""The KV block allocator: tables, reference counts, prefix sharing and LRU reuse of freed blocks."""
from lmforge.serve.block_manager import BlockManager
from lmforge.serve.sequence import SamplingParams, Sequence


def seq(tokens, name="s"):
    return Sequence(name, list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int):
    assert bm.ensure_slots(s, n)
    s.num_computed += n
    bm.register_full_blocks(s)


def test_allocates_blocks_as_tokens_arrive_and_frees_them():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(10))
    compute(bm, s, 10)
    assert len(s.block_table) == 3 and bm.num_used == 3
    assert bm.slot(s, 9) == s.block_table[2] * 4 + 1
    assert not bm.ensure_slots(s, 7)          # 17 tokens would need a 5th block
    bm.free_sequence(s)
    assert bm.num_used == 0 and s.block_table == [] and s.num_computed == 0


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(12), "a")
    compute(bm, a, 12)
    b = seq(list(range(8)) + [99, 98, 97], "b")
    bm.allocate_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8 and b.num_cached_prompt == 8
    assert bm.ref_count[a.block_table[0]] == 2
    bm.free_sequence(a)
    assert bm.ref_count[b.block_table[0]] == 1 and bm.num_used == 2


def test_at_least_one_prompt_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8), "a")
    compute(bm, a, 8)
    b = seq(range(8), "b")                    # identical prompt: only the first block may be reused
    bm.allocate_prefix(b)
    assert b.num_computed == 4


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    bm.free_sequence(a)
    b = seq([1, 2, 3, 4, 9], "b")
    bm.allocate_prefix(b)
    assert b.num_computed == 4                # revived from the free list
    bm.free_sequence(b)
    c = seq([7, 7, 7, 7, 7, 7], "c")          # needs all 3 blocks: evicts the cached ones
    compute(bm, c, 6)
    d = seq([1, 2, 3, 4, 5], "d")
    bm.free_sequence(c)
    bm.allocate_prefix(d)
    assert d.num_computed == 0                # the old prefix is gone (overwritten)


def test_hash_collision_cannot_share_different_tokens():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3], "a")
    compute(bm, a, 3)
    h = a.block_hashes[0]
    bm.block_key[a.block_table[0]] = (h, (5, 6))   # pretend another block's tokens had this hash
    b = seq([1, 2, 3], "b")
    bm.allocate_prefix(b)
    assert b.num_computed == 0


def test_no_prefix_caching_mode():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    a = seq([1, 2, 3], "a")
    compute(bm, a, 3)
    b = seq([1, 2, 3], "b")
    bm.allocate_prefix(b)
    assert b.num_computed == 0 and not bm.by_hash
