"""The block manager: which KV-cache blocks each sequence owns, and the prefix cache.

The cache is ``num_blocks`` blocks of ``block_size`` token slots (per layer, K and V
tensors ``[num_blocks, block_size, kv_heads, head_dim]`` held by the model runner).
Block 0 is never handed out: padded rows of a CUDA-graph batch write their K/V there.

Usage::

    bm = BlockManager(num_blocks=64, block_size=16)
    bm.match_prefix(seq)             # share cached full blocks of seq's leading tokens
    if bm.reserve(seq, n): ...       # blocks for seq's next n tokens, or False
    bm.commit(seq)                   # after the forward: register newly full blocks
    bm.release(seq)                  # finish / abort / preempt
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections import OrderedDict

from fscale.serve.sequence import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


HASH_BYTES = 16


def new_hash_key() -> bytes:
    """A secret key for :func:`block_hash`, fresh for each block manager."""
    return secrets.token_bytes(32)


def block_hash(parent: bytes | None, tokens: list[int], key: bytes) -> bytes:
    """Key of a full block: its tokens and (through ``parent``) every token before it.

    A keyed BLAKE2b digest, not Python's ``hash``: that one is predictable for ints, so
    a client could craft a prompt whose block collides with another request's and be
    served that request's K/V (a cache hit compares keys, not tokens; cf. vLLM's
    CVE-2025-25183). The encoding is unambiguous: a parent marker, the parent's digest,
    then fixed-width token ids.
    """
    h = hashlib.blake2b(key=key, digest_size=HASH_BYTES)
    h.update(b"\x00" if parent is None else b"\x01" + parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Free list, reference counts and the prefix cache of the paged KV cache.

    [Note: block states]
    Every block but 0 is in exactly one state: *owned* (``ref > 0``; in the block
    tables of ``ref`` sequences; not in ``free``) or *free* (``ref == 0``; in ``free``).
    A free block may still be *cached*: it holds a full block of K/V under a hash in
    ``cached`` and can be revived by ``match_prefix`` until ``reserve`` evicts it.
    ``free`` is in eviction order: blocks without a hash first, then cached blocks
    least recently released first (LRU). Only a full, hashed block is ever shared
    (``ref > 1``); a sequence writes only into its own unshared tail blocks, because
    ``match_prefix`` never shares the block holding a sequence's last token.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.hash_key = new_hash_key()
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    # -- sizes ------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Blocks that sequences can use (block 0 excluded)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.total - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    # -- allocation -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of ``seq``'s leading full blocks; returns tokens hit.

        Called on a sequence holding no blocks. At least one token is left to compute
        (its logits give the next token), so the block holding the last token is
        never shared.
        """
        assert not seq.block_table and seq.num_computed == 0, seq
        if not self.prefix_caching:
            return 0
        bs, tokens = self.block_size, seq.token_ids
        parent = None
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs], self.hash_key)
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            seq.block_table.append(b)
            parent = h
        seq.num_hashed = len(seq.block_table)
        seq.last_hash = parent
        seq.num_computed = len(seq.block_table) * bs
        return seq.num_computed

    def can_reserve(self, seq: Sequence, n: int) -> bool:
        return self.blocks_for(seq.num_computed + n) - len(seq.block_table) <= len(self.free)

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for ``seq``'s next ``n`` tokens (all or none); False if too few are free."""
        need = self.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:  # evict its cached content
                del self.cached[h]
                self.hash_of[b] = None
            self.ref[b] = 1
            seq.block_table.append(b)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that the last forward filled, so later prompts can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while seq.num_hashed < seq.num_computed // bs:
            i = seq.num_hashed
            h = block_hash(seq.last_hash, seq.token_ids[i * bs : (i + 1) * bs], self.hash_key)
            b = seq.block_table[i]
            # The same content may already be cached in another block (two prompts
            # computed it in the same step): keep that one, ours stays private.
            if h not in self.cached:
                self.cached[h] = b
                self.hash_of[b] = h
            seq.last_hash = h
            seq.num_hashed += 1

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody holds become free (cached ones findable)."""
        # Tail blocks first: they are the least likely to be shared by a later prompt.
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, (b, seq)
            if self.ref[b] == 0:
                self.free[b] = None
                if self.hash_of[b] is None:  # nothing worth keeping: evict it first
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed = 0
        seq.last_hash = None

    # -- checks -----------------------------------------------------------------------------

    def check(self, seqs: list[Sequence]) -> None:
        """Assert [Note: block states] for the sequences that hold blocks (tests call it)."""
        counts = [0] * self.num_blocks
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"block twice in {seq}"
            assert len(seq.block_table) == self.blocks_for(seq.num_computed) or (
                len(seq.block_table) >= self.blocks_for(seq.num_computed)
            ), seq
            for b in seq.block_table:
                assert b != 0, f"block 0 handed out to {seq}"
                counts[b] += 1
        for b in range(1, self.num_blocks):
            assert counts[b] == self.ref[b], f"block {b}: ref {self.ref[b]} but {counts[b]} owners"
            assert (self.ref[b] == 0) == (b in self.free), f"block {b} free-list state is wrong"
            if self.ref[b] > 1:
                assert self.hash_of[b] is not None, f"unhashed block {b} shared by {counts[b]}"
        assert 0 not in self.free
        for h, b in self.cached.items():
            assert self.hash_of[b] == h, f"cached hash of block {b} is stale"
