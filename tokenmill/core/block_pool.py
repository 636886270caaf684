"""BlockPool: the physical KV blocks, their reference counts and the free queue.

    block ids:   0   1   2   3   4   5   6   7
    ref_cnt:     1   2   0   0   1   0   0   0
    free queue:  head -> 2 -> 3 -> 5 -> 6 -> 7   (allocation pops from the head)

A block is either free (ref_cnt 0, in the free queue) or used (ref_cnt > 0, owned by that many
requests). Blocks freed together go to the tail in the order given, so the caller decides which of
them are reused first.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        # NOTE: an OrderedDict is a free queue with O(1) removal from the middle (needed once a
        # cached free block is revived) and O(1) pops from the head.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks that reach zero join the free queue's tail."""
        for block_id in block_ids:
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def check_integrity(self) -> None:
        for block_id, cnt in enumerate(self.ref_cnt):
            if cnt < 0:
                raise AssertionError(f"block {block_id} has negative ref count {cnt}")
            if (cnt == 0) != (block_id in self._free):
                raise AssertionError(f"block {block_id}: ref count {cnt} but "
                                     f"{'in' if block_id in self._free else 'not in'} the free queue")
