"""Prefix caching, forks (copy-on-write) and swap at the block level: no model, exact block ids."""
from __future__ import annotations

import pytest
import helpers

from tokenmill.core.block_hash import hash_block
from tokenmill.core.scheduler import Scheduler
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], max_tokens: int = 8, arrival: float = 0.0) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), arrival_time=arrival)


def make_scheduler(num_blocks=16, budget=64, swap=False, host_blocks=0, caching=True) -> Scheduler:
    return helpers.make_scheduler(num_blocks, BS, budget, max_num_seqs=8, num_host_blocks=host_blocks,
                                  enable_prefix_caching=caching, preemption_mode="swap" if swap else "recompute")


def run_step(sched: Scheduler, reqs: dict[str, Request], next_token=lambda rid: 7):
    out = sched.schedule()
    for s in out.scheduled:
        if s.will_sample:
            sched.append_token(reqs[s.request_id], next_token(s.request_id))
    sched.check_integrity()
    return out


def finish(sched: Scheduler, req: Request) -> None:
    sched.finish_request(req, RequestStatus.FINISHED_LENGTH)
    sched.check_integrity()


def test_chained_hash_depends_on_the_prefix():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == a
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 5]) != a


def test_second_request_reuses_the_cached_prefix():
    sched = make_scheduler()
    a = make_request("a", list(range(10)))  # blocks: [0-3] [4-7] [8-9]
    reqs = {"a": a}
    sched.add_request(a)
    out = run_step(sched, reqs)
    assert out.scheduled[0].num_tokens == 10 and a.block_ids == [0, 1, 2]
    b = make_request("b", list(range(8)) + [50, 51, 52])  # shares the two full blocks
    reqs["b"] = b
    sched.add_request(b)
    out = run_step(sched, reqs)
    sb = next(s for s in out.scheduled if s.request_id == "b")
    assert sb.start_pos == 8 and sb.token_ids == [50, 51, 52]  # only the rest is computed
    assert b.block_ids[:2] == [0, 1] and sched.kv.pool.ref_cnt[0] == 2
    assert sched.kv.prefix_cache_queries == 10 + 11 and sched.kv.prefix_cache_hits == 8


def test_hit_never_covers_the_last_prompt_token():
    sched = make_scheduler()
    a = make_request("a", list(range(8)))  # exactly two full blocks
    reqs = {"a": a}
    sched.add_request(a)
    run_step(sched, reqs)
    b = make_request("b", list(range(8)))  # identical prompt
    reqs["b"] = b
    sched.add_request(b)
    out = run_step(sched, reqs)
    sb = next(s for s in out.scheduled if s.request_id == "b")
    # Only the first block is reused: the second holds the last token, which must run for logits.
    assert sb.start_pos == 4 and sb.token_ids == [4, 5, 6, 7] and sb.will_sample
    assert sched.kv.prefix_cache_hits == 4


def test_finished_blocks_stay_cached_and_are_evicted_lru():
    sched = make_scheduler(num_blocks=6)
    reqs = {}
    for rid, base in (("a", 0), ("b", 100)):
        r = make_request(rid, [base + i for i in range(8)] + [base + 99], max_tokens=1)
        reqs[rid] = r
        sched.add_request(r)
        run_step(sched, reqs)
        finish(sched, r)
    kv = sched.kv
    # a held [0,1,2], b [3,4,5]; freed tail first: the free queue is 2,1,0,5,4,3.
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 4  # full blocks 0,1,3,4 (2, 5 partial)
    assert list(kv.pool._free) == [2, 1, 0, 5, 4, 3]
    # A new request needing 2 fresh blocks takes the LRU head: 2 (no hash) and 1 (a's 2nd block).
    c = make_request("c", [500 + i for i in range(6)])
    reqs["c"] = c
    sched.add_request(c)
    run_step(sched, reqs)
    assert c.block_ids == [2, 1]
    assert kv.num_cached_blocks == 3
    # a's first block is still cached; its second is gone, so a repeat of a hits one block only.
    d = make_request("d", list(range(8)) + [99])
    reqs["d"] = d
    sched.add_request(d)
    run_step(sched, reqs)
    assert d.block_ids[0] == 0 and d.num_computed_tokens == 9
    assert sched.kv.prefix_cache_hits == 4
    for r in (c, d):
        finish(sched, r)
    assert kv.num_used_blocks == 0


def test_prefix_caching_off_shares_nothing():
    sched = make_scheduler(caching=False)
    reqs = {}
    for rid in ("a", "b"):
        r = make_request(rid, list(range(10)))
        reqs[rid] = r
        sched.add_request(r)
    run_step(sched, reqs)
    assert set(reqs["a"].block_ids).isdisjoint(reqs["b"].block_ids)
    assert sched.kv.prefix_cache_queries == 0 and sched.kv.num_cached_blocks == 0


def test_fork_shares_prompt_blocks_and_copies_the_partial_block_on_write():
    sched = make_scheduler()
    leader = make_request("0_x", list(range(10)), max_tokens=4)  # 10 tokens: blocks [0-3] [4-7] [8-9]
    sample = make_request("1_x", list(range(10)), max_tokens=4)
    reqs = {"0_x": leader, "1_x": sample}
    sched.add_request(leader)
    sched.add_request(sample, fork_of=leader)
    assert sched.num_waiting == 2
    out = run_step(sched, reqs, lambda rid: 100 if rid == "0_x" else 200)
    assert [s.request_id for s in out.scheduled] == ["0_x"]  # the sample waits for the prompt
    out = run_step(sched, reqs, lambda rid: 100 if rid == "0_x" else 200)
    # The sample joined sharing all three blocks and computed only the last prompt token (pos 9),
    # which lives in the shared partial block: that block was copied first.
    ss = next(s for s in out.scheduled if s.request_id == "1_x")
    assert ss.start_pos == 9 and ss.token_ids == [9] and ss.will_sample
    assert sample.block_ids[:2] == leader.block_ids[:2]
    assert sample.block_ids[2] != leader.block_ids[2]
    # The leader decoded first in the step: it wrote into the shared block, so it was the one copied.
    copies = out.blocks_to_copy
    assert len(copies) == 1
    assert sched.kv.pool.ref_cnt[leader.block_ids[0]] == 2
    assert sample.output_token_ids == [200] and leader.output_token_ids == [100, 100]
    for r in (leader, sample):
        finish(sched, r)
    assert sched.kv.num_used_blocks == 0


def test_aborting_a_waiting_fork_and_its_leader_leaks_nothing():
    sched = make_scheduler()
    leader = make_request("0_x", list(range(6)))
    sample = make_request("1_x", list(range(6)))
    sched.add_request(leader)
    sched.add_request(sample, fork_of=leader)
    run_step(sched, {"0_x": leader, "1_x": sample})
    sched.finish_request(sample, RequestStatus.FINISHED_ABORTED)
    sched.finish_request(leader, RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    assert sched.num_unfinished == 0 and sched.kv.num_used_blocks == 0


def two_growing_requests(sched: Scheduler):
    """Two 8-token prompts with 12 tokens to go: in 6 blocks of 4 one of them must be preempted."""
    a = make_request("a", list(range(8)), max_tokens=12, arrival=0.0)
    b = make_request("b", list(range(100, 108)), max_tokens=12, arrival=1.0)
    for r in (a, b):
        sched.add_request(r)
    return a, b, {"a": a, "b": b}


def test_swap_out_and_in_keeps_progress_and_accounts_host_blocks():
    sched = make_scheduler(num_blocks=6, swap=True, host_blocks=8)
    a, b, reqs = two_growing_requests(sched)
    swapped_out = None
    for _ in range(40):
        out = run_step(sched, reqs)
        if out.blocks_to_swap_out and swapped_out is None:
            swapped_out = list(out.blocks_to_swap_out)
            assert out.preempted_ids == ["b"]  # the latest arrival
            assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens > 0
            assert len(b.swapped_block_ids) == len(swapped_out) and not b.block_ids
            assert sched.num_swapped == 1 and sched.kv.num_free_host_blocks == 8 - len(swapped_out)
        if out.blocks_to_swap_in:
            assert sorted(h for h, _ in out.blocks_to_swap_in) == sorted(h for _, h in swapped_out)
            assert b.status == RequestStatus.RUNNING and sched.num_swapped == 0
        for r in list(reqs.values()):
            if r.num_output_tokens >= 12 and not r.is_finished:
                finish(sched, r)
        if not sched.num_unfinished:
            break
    assert swapped_out is not None and sched.num_swap_outs == 1
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert sched.kv.num_used_blocks == 0 and sched.kv.num_free_host_blocks == 8


def test_swap_falls_back_to_recompute_when_the_host_space_is_full():
    sched = make_scheduler(num_blocks=6, swap=True, host_blocks=1)
    a, b, reqs = two_growing_requests(sched)
    while sched.num_preemptions == 0:
        run_step(sched, reqs)
    assert sched.num_swap_outs == 0 and b.status == RequestStatus.WAITING and b.num_computed_tokens == 0


def test_aborting_a_swapped_request_frees_its_host_blocks():
    sched = make_scheduler(num_blocks=6, swap=True, host_blocks=8)
    a, b, reqs = two_growing_requests(sched)
    while b.status != RequestStatus.SWAPPED:
        run_step(sched, reqs)
    sched.finish_request(b, RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    assert sched.kv.num_free_host_blocks == 8 and sched.num_swapped == 0


@pytest.mark.parametrize("corrupt", ["hash", "counter"])
def test_integrity_catches_cache_corruption(corrupt):
    sched = make_scheduler()
    a = make_request("a", list(range(9)), max_tokens=1)
    sched.add_request(a)
    run_step(sched, {"a": a})
    finish(sched, a)
    pool = sched.kv.pool
    if corrupt == "hash":
        pool.block_hash[0] = b"x" * 32
    else:
        pool._num_cached_free += 1
    with pytest.raises(AssertionError):
        sched.check_integrity()
