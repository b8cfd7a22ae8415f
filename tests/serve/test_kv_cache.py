"""The block manager: allocation, release, prefix sharing, LRU eviction, invariants."""

from __future__ import annotations

import pytest

from fscale.serve.kv_cache import HASH_BYTES, BlockManager, block_hash
from fscale.serve.params import SamplingParams
from fscale.serve.sequence import Sequence


def _seq(tokens, i=0):
    return Sequence(f"s{i}", tokens, SamplingParams(), arrival=i)


def _compute(bm, seq, n=None):
    """What the engine does around a forward: reserve, advance, commit."""
    n = seq.remaining if n is None else n
    assert bm.reserve(seq, n)
    seq.num_computed += n
    bm.commit(seq)


def test_reserve_and_release():
    bm = BlockManager(8, 4)
    assert bm.total == 7 and bm.num_free == 7
    s = _seq(list(range(10)))
    _compute(bm, s)
    assert len(s.block_table) == 3 and 0 not in s.block_table
    bm.check([s])
    assert bm.num_used == 3
    bm.release(s)
    assert bm.num_used == 0 and s.block_table == [] and s.num_computed == 0
    bm.check([])


def test_reserve_is_all_or_nothing():
    bm = BlockManager(4, 4)
    s = _seq(list(range(20)))
    assert not bm.reserve(s, 20)  # needs 5 blocks, 3 exist
    assert s.block_table == [] and bm.num_free == 3


def test_prefix_sharing_and_last_token_never_shared():
    bm = BlockManager(16, 4)
    a = _seq(list(range(12)), 0)
    _compute(bm, a)
    b = _seq(list(range(12)), 1)
    # 12 tokens = 3 full blocks, but the block holding the last token is recomputed.
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    _compute(bm, b)
    assert b.block_table[2] != a.block_table[2]
    bm.check([a, b])
    c = _seq(list(range(8)) + [99, 98, 97, 96, 95], 2)
    assert bm.match_prefix(c) == 8
    bm.release(c)
    d = _seq([0, 1, 2, 3, 7, 7, 7, 7, 7], 3)  # first block shared, second differs
    assert bm.match_prefix(d) == 4
    bm.release(d)
    bm.check([a, b])


def test_block_keys_are_keyed_digests_of_parent_and_tokens():
    bm = BlockManager(16, 4)
    first = block_hash(None, [1, 2, 3, 4], bm.hash_key)
    assert isinstance(first, bytes) and len(first) == HASH_BYTES
    assert first == block_hash(None, [1, 2, 3, 4], bm.hash_key)
    assert first != block_hash(None, [1, 2, 3, 5], bm.hash_key)  # one token changed
    second = block_hash(first, [5, 6, 7, 8], bm.hash_key)
    assert second != block_hash(None, [5, 6, 7, 8], bm.hash_key)  # the parent counts
    assert second != block_hash(second, [5, 6, 7, 8], bm.hash_key)
    # Another engine's key gives other digests: nobody can precompute a collision.
    assert BlockManager(16, 4).hash_key != bm.hash_key
    assert block_hash(None, [1, 2, 3, 4], BlockManager(16, 4).hash_key) != first
    # The cache is indexed by these digests.
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
    _compute(bm, a)
    assert set(bm.cached) == {first, second}
    assert a.last_hash == second


def test_cached_blocks_survive_release_until_evicted_lru():
    bm = BlockManager(5, 2)  # 4 usable blocks
    a = _seq([1, 2, 3, 4, 5], 0)
    _compute(bm, a)  # blocks for [1,2] [3,4] [5]
    bm.release(a)
    assert bm.num_free == 4
    b = _seq([1, 2, 3, 4, 6], 1)
    assert bm.match_prefix(b) == 4  # revived from the free list
    bm.release(b)
    # A request that needs every block evicts the cached ones; nothing is found after.
    c = _seq(list(range(100, 108)), 2)
    _compute(bm, c)
    bm.release(c)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 9], 3)) == 0


def test_unhashed_blocks_are_evicted_first():
    bm = BlockManager(6, 2)  # 5 usable
    a = _seq([1, 2, 3, 4, 5], 0)
    _compute(bm, a)  # two full hashed blocks + one partial
    bm.release(a)
    partial = next(iter(bm.free))
    assert bm.hash_of[partial] is None
    s = _seq([9, 9], 1)
    _compute(bm, s)
    assert s.block_table == [partial]


def test_check_catches_a_double_owner():
    bm = BlockManager(8, 4)
    a, b = _seq([1, 2, 3], 0), _seq([4, 5, 6], 1)
    _compute(bm, a)
    _compute(bm, b)
    b.block_table = list(a.block_table)  # corrupt: a private block owned twice
    with pytest.raises(AssertionError):
        bm.check([a, b])


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(8, 0)
