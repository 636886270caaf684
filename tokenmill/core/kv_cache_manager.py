"""KVCacheManager: each request's block table, grown as its tokens are computed.

A request holds ceil(num_computed_tokens / block_size) blocks after a step: blocks are taken the
step their first token is computed (never max_tokens ahead) and all given back the step the
request finishes, is aborted or is preempted.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenmill.core.block_pool import BlockPool
from tokenmill.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_queries = 0  # prompt tokens looked up (counter, tokens)
        self.prefix_cache_hits = 0  # of those, found cached (counter, tokens)

    @property
    def num_cached_blocks(self) -> int:
        return 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Give `request` room for `num_new_tokens` more computed tokens; False if blocks ran out."""
        n = self.num_new_blocks(request, num_new_tokens)
        if n > self.pool.num_free_blocks:
            return False
        if n:
            request.block_ids.extend(self.pool.allocate(n))
        return True

    def free(self, request: Request) -> None:
        # Tail first: the blocks at the end of a sequence are the least likely to be shared later,
        # so they should be the first reused.
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []

    def check_integrity(self, live_requests: Iterable[Request]) -> None:
        """Raise AssertionError unless every reference count is explained by a live request."""
        self.pool.check_integrity()
        refs: Counter[int] = Counter()
        for req in live_requests:
            refs.update(req.block_ids)
            expected = cdiv(req.num_computed_tokens, self.block_size)
            if len(req.block_ids) < expected:
                raise AssertionError(f"{req} has {len(req.block_ids)} blocks for "
                                     f"{req.num_computed_tokens} computed tokens")
        for block_id, cnt in enumerate(self.pool.ref_cnt):
            if cnt != refs.get(block_id, 0):
                raise AssertionError(f"block {block_id} has ref count {cnt} but "
                                     f"{refs.get(block_id, 0)} live references")
