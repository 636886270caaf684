"""KVCacheManager: each request's block table, grown as its tokens are computed.

A request holds ceil(num_computed_tokens / block_size) blocks after a step: blocks are taken the
step their first token is computed (never max_tokens ahead) and given back the step the request
finishes, is aborted or is preempted. On top of that:

- Prefix caching: each full block is entered in the pool's cache under its chained content hash;
  a new request starts with every cached block of its leading full blocks (never the block holding
  its last token: one token must run to produce logits) and computes only the rest.
- Forks (n > 1): a sample shares its leader's blocks; the first write into a shared, partly filled
  block copies it first (copy on write).
- Swap: a preempted request's blocks are copied to host blocks and back.

Copies are not done here (no tensors in core/): they are queued as (src, dst) block pairs that the
scheduler hands to the model runner, which performs them before the step's forward pass, in the
order swap-out, swap-in, copy-on-write.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenmill.core.block_hash import extend_block_hashes
from tokenmill.core.block_pool import BlockPool
from tokenmill.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.num_host_blocks = num_host_blocks
        self._host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self.prefix_cache_queries = 0  # prompt tokens looked up (counter, tokens)
        self.prefix_cache_hits = 0  # of those, found cached (counter, tokens)
        # Block copies the runner must do before the next forward pass: (src, dst) pairs.
        self.pending_swap_out: list[tuple[int, int]] = []  # (device block, host block)
        self.pending_swap_in: list[tuple[int, int]] = []  # (host block, device block)
        self.pending_copies: list[tuple[int, int]] = []  # (device block, device block)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks still holding a cached prefix (evictable)."""
        return self.pool.num_cached_free_blocks

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    # ---- prefix cache ------------------------------------------------------------------------

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks matching the request's leading full blocks, none covering its last token."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens_with_pending - 1) // self.block_size
        hashes = extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, max_blocks)
        hits = []
        for h in hashes[:max_blocks]:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _register_full_blocks(self, request: Request, num_computed: int) -> None:
        if not self.enable_prefix_caching:
            return
        # Only blocks of known tokens: a pending token (computed before Python knows it) waits.
        num_full = min(num_computed, request.num_tokens) // self.block_size
        if request.num_registered_blocks >= num_full:
            return
        hashes = extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, num_full)
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], hashes[i])
        request.num_registered_blocks = num_full

    # ---- allocation --------------------------------------------------------------------------

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(request.block_ids))

    def _write_block_is_shared(self, request: Request) -> bool:
        idx = request.num_computed_tokens // self.block_size
        return idx < len(request.block_ids) and self.pool.ref_cnt[request.block_ids[idx]] > 1

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = (),
                       register: bool = True) -> bool:
        """Give `request` room for `num_new_tokens` more computed tokens; False (and no change) if
        blocks ran out. `cached_blocks` (from find_cached_prefix, for a request that holds no
        blocks yet) become its first blocks; the new tokens come after their tokens, which the
        scheduler then counts as computed (it alone advances num_computed_tokens)."""
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new = max(0, cdiv(total, self.block_size) - len(request.block_ids) - len(cached_blocks))
        copy_on_write = not cached_blocks and num_new_tokens > 0 and self._write_block_is_shared(request)
        needed = num_new + copy_on_write + self.pool.count_revivals(cached_blocks)
        if needed > self.pool.num_free_blocks:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            request.block_ids.extend(cached_blocks)
            request.num_registered_blocks = len(cached_blocks)
        if copy_on_write:
            idx = num_computed // self.block_size
            src = request.block_ids[idx]
            (dst,) = self.pool.allocate(1)
            self.pending_copies.append((src, dst))
            self.pool.free([src])
            request.block_ids[idx] = dst
        if num_new:
            request.block_ids.extend(self.pool.allocate(num_new))
        if register:  # not for blocks a KV pull will fill: none may hit them in the cache before
            self._register_full_blocks(request, total)
        return True

    def register_computed(self, request: Request) -> None:
        """Enter the request's full computed blocks in the prefix cache (after a KV pull filled them)."""
        self._register_full_blocks(request, request.num_computed_tokens)

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_query_tokens
            self.prefix_cache_hits += num_hit_tokens

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """`child` gets the blocks of `parent`'s first num_tokens computed tokens, shared (the
        scheduler then counts those tokens as computed for it)."""
        assert not child.block_ids and num_tokens <= parent.num_computed_tokens
        shared = parent.block_ids[:cdiv(num_tokens, self.block_size)]
        self.pool.touch(shared)
        child.block_ids = list(shared)
        child.num_registered_blocks = 0

    def free(self, request: Request) -> None:
        # Tail first: the blocks at the end of a sequence are the least likely to be shared later,
        # so they should be the first evicted.
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_registered_blocks = 0
        if request.swapped_block_ids:
            self._host_free.extend(request.swapped_block_ids)
            request.swapped_block_ids = []

    # ---- swap ----------------------------------------------------------------------------------

    def swap_out(self, request: Request) -> bool:
        """Move the request's KV to host blocks and free its device blocks; False if host is full."""
        n = len(request.block_ids)
        if n > len(self._host_free):
            return False
        host = [self._host_free.pop() for _ in range(n)]
        self.pending_swap_out.extend(zip(request.block_ids, host))
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_registered_blocks = 0
        request.swapped_block_ids = host
        return True

    def swap_in(self, request: Request, num_new_tokens: int) -> bool:
        """Bring a swapped request's KV back, with room for num_new_tokens more; False if it can't."""
        n = len(request.swapped_block_ids)
        total = max(n, cdiv(request.num_computed_tokens + num_new_tokens, self.block_size))
        if total > self.pool.num_free_blocks:
            return False
        device = self.pool.allocate(n)
        self.pending_swap_in.extend(zip(request.swapped_block_ids, device))
        self._host_free.extend(request.swapped_block_ids)
        request.swapped_block_ids = []
        request.block_ids = device
        assert self.allocate_slots(request, num_new_tokens)
        return True

    def take_pending_ops(self) -> tuple[list, list, list]:
        ops = (self.pending_swap_out, self.pending_swap_in, self.pending_copies)
        self.pending_swap_out, self.pending_swap_in, self.pending_copies = [], [], []
        return ops

    # ---- checks --------------------------------------------------------------------------------

    def check_integrity(self, live_requests: Iterable[Request]) -> None:
        """Raise AssertionError unless every reference count is explained by a live request."""
        self.pool.check_integrity()
        refs: Counter[int] = Counter()
        host: Counter[int] = Counter()
        for req in live_requests:
            refs.update(req.block_ids)
            host.update(req.swapped_block_ids)
            if req.swapped_block_ids:
                expected = cdiv(req.num_computed_tokens, self.block_size)
                if req.block_ids or len(req.swapped_block_ids) != expected:
                    raise AssertionError(f"{req} is swapped but holds device blocks or the wrong host blocks")
                continue
            expected = cdiv(req.num_computed_tokens + req.num_loading_tokens, self.block_size)
            if len(req.block_ids) != expected:
                raise AssertionError(f"{req} has {len(req.block_ids)} blocks for "
                                     f"{req.num_computed_tokens} computed tokens")
        for block_id, cnt in enumerate(self.pool.ref_cnt):
            if cnt != refs.get(block_id, 0):
                raise AssertionError(f"block {block_id} has ref count {cnt} but "
                                     f"{refs.get(block_id, 0)} live references")
        if any(c > 1 for c in host.values()) or set(host) & set(self._host_free) \
                or len(host) + len(self._host_free) != self.num_host_blocks:
            raise AssertionError("host swap blocks are double-booked or leaked")
