"""BlockPool and KVCacheManager unit tests: pure Python, no model."""
from __future__ import annotations

import pytest

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.kv_cache_manager import KVCacheManager, cdiv
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def make_request(request_id: str, prompt_len: int, arrival_time: float = 0.0) -> Request:
    return Request(request_id, list(range(prompt_len)), SamplingParams(max_tokens=None),
                   arrival_time=arrival_time)


def free_queue(pool: BlockPool) -> list[int]:
    return list(pool._free)


# ---- BlockPool -------------------------------------------------------------------------------------


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_pops_from_head_in_id_order():
    pool = BlockPool(8)
    assert pool.num_free_blocks == 8 and pool.num_used_blocks == 0
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 5
    assert pool.ref_cnt == [1, 1, 1, 1, 1, 0, 0, 0]
    assert free_queue(pool) == [5, 6, 7]
    pool.check_integrity()


def test_free_queue_is_fifo():
    pool = BlockPool(6)
    assert pool.allocate(4) == [0, 1, 2, 3]
    # Freed blocks join the tail in the order given: the never-used 4, 5 are reused first.
    pool.free([2, 0])
    assert free_queue(pool) == [4, 5, 2, 0]
    pool.free([3])
    assert free_queue(pool) == [4, 5, 2, 0, 3]
    assert pool.allocate(3) == [4, 5, 2]
    assert pool.allocate(2) == [0, 3]
    assert pool.num_free_blocks == 0
    pool.check_integrity()


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert free_queue(pool) == [3]
    assert pool.ref_cnt == [1, 1, 1, 0]
    assert pool.allocate(1) == [3]
    pool.check_integrity()


def test_ref_counts_shared_block():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    # A second owner of block a (what a prefix cache does when two requests share it).
    pool.ref_cnt[a] += 1
    pool.check_integrity()
    pool.free([a, b])
    assert pool.ref_cnt[:2] == [1, 0]
    assert free_queue(pool) == [2, 3, b]  # b reached zero; a still has an owner
    assert pool.num_used_blocks == 1
    pool.check_integrity()
    pool.free([a])
    assert pool.ref_cnt[a] == 0
    assert free_queue(pool) == [2, 3, b, a]
    assert pool.num_used_blocks == 0
    pool.check_integrity()


def test_double_free_raises():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([ids[0]])


def test_free_of_never_allocated_block_raises():
    pool = BlockPool(4)
    with pytest.raises(RuntimeError):
        pool.free([3])


def test_free_same_block_twice_in_one_call_raises():
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    with pytest.raises(RuntimeError):
        pool.free([a, a])


def _corrupt_ref_of_free_block(pool: BlockPool) -> None:
    pool.ref_cnt[3] = 1  # in the free queue but owned


def _corrupt_zero_ref_of_used_block(pool: BlockPool) -> None:
    pool.ref_cnt[0] = 0  # used (not in the free queue) but nobody owns it: leaked


def _corrupt_negative_ref(pool: BlockPool) -> None:
    pool.ref_cnt[3] = -1


def _corrupt_drop_from_free_queue(pool: BlockPool) -> None:
    del pool._free[2]  # free block lost from the queue


def _corrupt_used_block_in_free_queue(pool: BlockPool) -> None:
    pool._free[1] = None  # used block also handed out as free


@pytest.mark.parametrize("corrupt", [_corrupt_ref_of_free_block, _corrupt_zero_ref_of_used_block,
                                     _corrupt_negative_ref, _corrupt_drop_from_free_queue,
                                     _corrupt_used_block_in_free_queue])
def test_pool_check_integrity_catches_corruption(corrupt):
    pool = BlockPool(5)
    pool.allocate(2)  # 0, 1 used; 2, 3, 4 free
    pool.check_integrity()
    corrupt(pool)
    with pytest.raises(AssertionError):
        pool.check_integrity()


# ---- KVCacheManager --------------------------------------------------------------------------------


def test_cdiv():
    assert [cdiv(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_num_new_blocks_counts_only_missing_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 10)
    assert kv.num_new_blocks(req, 0) == 0
    assert kv.num_new_blocks(req, 1) == 1
    assert kv.num_new_blocks(req, 4) == 1
    assert kv.num_new_blocks(req, 5) == 2
    assert kv.num_new_blocks(req, 10) == 3
    assert kv.allocate_slots(req, 5)
    req.num_computed_tokens = 5
    assert req.block_ids == [0, 1]
    assert kv.num_new_blocks(req, 3) == 0  # 8 tokens: still 2 blocks
    assert kv.num_new_blocks(req, 4) == 1  # 9 tokens: 3 blocks


def test_allocate_slots_grows_block_table_lazily():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 6)
    expected_blocks = []
    # one token at a time: a new block exactly when a token starts a new block
    for step in range(13):
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        assert len(req.block_ids) == cdiv(req.num_computed_tokens, 4)
        if step % 4 == 0:
            expected_blocks.append(step // 4)
        assert req.block_ids == expected_blocks
        kv.check_integrity([req])
    assert req.block_ids == [0, 1, 2, 3]
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 4


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 8), make_request("b", 16)
    assert kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    assert a.block_ids == [0, 1]
    assert not kv.allocate_slots(b, 12)  # needs 3 blocks, 2 free
    assert b.block_ids == []
    assert kv.num_free_blocks == 2
    assert kv.allocate_slots(b, 8)
    assert b.block_ids == [2, 3]
    assert kv.allocate_slots(b, 8)  # no new block needed: still fits
    assert not kv.allocate_slots(a, 1)  # 9 tokens need a third block: none left
    assert a.block_ids == [0, 1]


def test_free_gives_back_blocks_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a, b = make_request("a", 12), make_request("b", 8)
    assert kv.allocate_slots(a, 12) and kv.allocate_slots(b, 8)
    a.num_computed_tokens, b.num_computed_tokens = 12, 8
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4]
    kv.free(a)
    assert a.block_ids == []
    assert kv.num_used_blocks == 2
    # 5 was never used; then a's blocks, last block first
    assert free_queue(kv.pool) == [5, 2, 1, 0]
    c = make_request("c", 16)
    assert kv.allocate_slots(c, 16)
    assert c.block_ids == [5, 2, 1, 0]
    kv.free(b)
    kv.free(c)
    assert free_queue(kv.pool) == [4, 3, 0, 1, 2, 5]
    assert kv.num_used_blocks == 0
    kv.check_integrity([])


def test_kv_check_integrity_catches_too_few_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    req = make_request("a", 8)
    assert kv.allocate_slots(req, 4)
    req.num_computed_tokens = 4
    kv.check_integrity([req])
    req.num_computed_tokens = 5  # computed without a block for token 5
    with pytest.raises(AssertionError, match="blocks for"):
        kv.check_integrity([req])


def test_kv_check_integrity_catches_leaked_block():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 4), make_request("b", 4)
    assert kv.allocate_slots(a, 4) and kv.allocate_slots(b, 4)
    a.num_computed_tokens = b.num_computed_tokens = 4
    kv.check_integrity([a, b])
    # b forgotten by the scheduler without being freed: its block is used by no live request
    with pytest.raises(AssertionError, match="live references"):
        kv.check_integrity([a])


def test_kv_check_integrity_catches_block_owned_twice():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 4), make_request("b", 4)
    assert kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    b.block_ids = list(a.block_ids)  # b claims a's block without a reference
    with pytest.raises(AssertionError):
        kv.check_integrity([a, b])
