"""BlockPool: the physical KV blocks, their reference counts, the free queue and the prefix cache.

    block ids:   0   1   2   3   4   5   6   7
    ref_cnt:     1   2   0   0   1   0   0   0
    hash:        h0  h1  h2  -   -   h5  -   -
    free queue:  head -> 2 -> 3 -> 5 -> 6 -> 7   (allocation pops from the head)
    cached:      {h0: 0, h1: 1, h2: 2, h5: 5}

A block is used (ref_cnt > 0, held by that many requests) or free (ref_cnt 0, in the free queue).
A full block also has a hash naming its content (see block_hash.py), and the cache maps the hash to
it. NOTE: eviction is lazy: a freed block keeps its hash and stays findable until allocate() pops
it from the head of the free queue for new content. Blocks freed later go to the tail, so the head
is the least recently used: LRU eviction for free. A cache hit on a free block revives it (touch):
it leaves the free queue without losing its content.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from tokenmill.core.block_hash import BlockHash


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        # NOTE: an OrderedDict is a free queue with O(1) removal from the middle (a revived cached
        # block) and O(1) pops from the head.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_cached_free = 0  # free blocks that still hold a hash

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._num_cached_free

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue, evicting whatever they cached."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        return ids

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            self.block_hash[block_id] = None
            self._num_cached_free -= 1
            if self.cached.get(h) == block_id:
                del self.cached[h]

    def touch(self, block_ids: Iterable[int]) -> None:
        """One more reference to each block (a prefix-cache hit or a fork); revives free ones."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
                if self.block_hash[block_id] is not None:
                    self._num_cached_free -= 1
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks that reach zero join the free queue's tail."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None
                if self.block_hash[block_id] is not None:
                    self._num_cached_free += 1

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Name a used, now full block by its content so later requests can share it."""
        if self.block_hash[block_id] is not None:
            return
        self.block_hash[block_id] = block_hash
        # Two requests may compute the same content into different blocks; the first stays findable.
        self.cached.setdefault(block_hash, block_id)

    def count_revivals(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks a touch() would take out of the free queue."""
        return sum(self.ref_cnt[b] == 0 for b in block_ids)

    def check_integrity(self) -> None:
        num_cached_free = 0
        for block_id, cnt in enumerate(self.ref_cnt):
            if cnt < 0:
                raise AssertionError(f"block {block_id} has negative ref count {cnt}")
            if (cnt == 0) != (block_id in self._free):
                raise AssertionError(f"block {block_id}: ref count {cnt} but "
                                     f"{'in' if block_id in self._free else 'not in'} the free queue")
            if cnt == 0 and self.block_hash[block_id] is not None:
                num_cached_free += 1
        if any(not 0 <= b < self.num_blocks for b in self._free):
            raise AssertionError("the free queue holds an invalid block id")
        if num_cached_free != self._num_cached_free:
            raise AssertionError(f"{num_cached_free} cached free blocks, counter says {self._num_cached_free}")
        for h, block_id in self.cached.items():
            if self.block_hash[block_id] != h:
                raise AssertionError(f"cache entry for block {block_id} does not match its hash")
