"""Scheduler unit tests: pure Python, no model.

A fake model stands in for the runner (helpers.Sim): every ScheduledRequest with `will_sample=True`
gets one new token appended, and a request is finished (FINISHED_LENGTH) once it has max_tokens
outputs. CheckedSim checks every decision of the bare fcfs mechanics on top.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
from helpers import Sim, output_token, prompt_tokens
from helpers import make_scheduler as _make_scheduler

from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import cdiv
from tokenmill.core.policy import FCFSPolicy
from tokenmill.core.scheduler import Scheduler, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 8, block_size: int = 4, max_num_batched_tokens: int = 16,
                   max_num_seqs: int = 4, chunked: bool = True,
                   model_max_len: int | None = None) -> Scheduler:
    """The bare mechanics: fcfs, recompute, no prefix caching, no admission control (tested apart)."""
    if model_max_len is None:
        # chunked prefill off: the longest sequence must fit the token budget
        model_max_len = 1024 if chunked else max_num_batched_tokens
    return _make_scheduler(num_blocks, block_size, max_num_batched_tokens, max_num_seqs, model_max_len,
                           enable_chunked_prefill=chunked)


class CheckedSim(Sim):
    """helpers.Sim, checking the scheduler's invariants and fcfs decisions at every step."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.num_chunked_prefills = 0  # prompt chunks that did not reach the end of the prompt

    def schedule(self) -> SchedulerOutput:
        sched = self.scheduler
        running_before = [r.request_id for r in sched.running]
        waiting_before = [r.request_id for r in sched.policy]
        computed_before = {rid: self.reqs[rid].num_computed_tokens for rid in running_before + waiting_before}
        assert all(computed_before[rid] == 0 for rid in waiting_before)

        out = sched.schedule()
        self.check_schedule(out, running_before, waiting_before, computed_before)
        return out

    def check_schedule(self, out: SchedulerOutput, running_before: list[str], waiting_before: list[str],
                       computed_before: dict[str, int]) -> None:
        sched, kv = self.scheduler, self.kv
        budget = sched.max_num_batched_tokens
        ids = [s.request_id for s in out.scheduled]

        # budgets
        assert out.num_batched_tokens <= budget
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        assert len(set(ids)) == len(ids)

        # each request's share of the step
        for s in out.scheduled:
            req = self.reqs[s.request_id]
            assert s.num_tokens >= 1
            assert req.status == RequestStatus.RUNNING
            assert s.start_pos == computed_before[s.request_id]
            assert req.num_computed_tokens == s.start_pos + s.num_tokens <= req.num_tokens
            assert s.token_ids == req.all_token_ids[s.start_pos:s.start_pos + s.num_tokens]
            assert s.will_sample == (req.num_computed_tokens == req.num_tokens)
            assert s.block_ids == req.block_ids
            assert len(s.block_ids) == cdiv(req.num_computed_tokens, kv.block_size)  # lazily, not ahead
            if s.start_pos < req.num_prompt_tokens:
                assert s.is_prefill
            elif s.num_tokens == 1:
                assert not s.is_prefill  # a decode
            if s.is_prefill and not s.will_sample:
                self.num_chunked_prefills += 1
            if not sched.chunked_prefill:
                assert s.will_sample  # without chunked prefill nothing is ever cut short

        # decodes (and prefills in progress) first, then new prompts in FCFS order
        from_running = [rid for rid in ids if rid in running_before]
        admitted = ids[len(from_running):]
        assert ids[:len(from_running)] == from_running
        assert from_running == [rid for rid in running_before if rid in from_running]
        assert admitted == waiting_before[:len(admitted)]
        assert [r.request_id for r in sched.running] == from_running + admitted

        # preemption: recompute, back to the front of the queue, nothing admitted that step
        preempted = out.preempted_ids
        assert set(preempted) <= set(running_before) - set(ids)
        for rid in preempted:
            req = self.reqs[rid]
            assert req.status == RequestStatus.WAITING
            assert req.num_computed_tokens == 0 and req.block_ids == []
            # the victim arrived after every request that kept its blocks behind it in the running order
            pos = running_before.index(rid)
            for other in from_running:
                if running_before.index(other) > pos:
                    assert req.times.arrival_time > self.reqs[other].times.arrival_time
        if preempted:
            assert admitted == []
        assert [r.request_id for r in sched.policy] == list(reversed(preempted)) + waiting_before[len(admitted):]

        # a running request is only skipped when the token budget is spent
        skipped = set(running_before) - set(ids) - set(preempted)
        if skipped:
            assert out.num_batched_tokens == budget

        # work conservation: admission stops only for a reason
        left = budget - out.num_batched_tokens
        if not preempted and len(sched.policy) and left > 0 and len(sched.running) < sched.max_num_seqs:
            head = sched.policy.peek()
            num_new = head.num_tokens
            if sched.chunked_prefill:
                assert kv.num_new_blocks(head, min(num_new, left)) > kv.num_free_blocks
            else:
                assert num_new > left or kv.num_new_blocks(head, num_new) > kv.num_free_blocks

        assert out.stats.num_running == len(sched.running)
        assert out.stats.num_waiting == len(sched.policy)
        assert out.stats.num_free_blocks == kv.num_free_blocks

    def check_state(self) -> None:
        super().check_state()
        live = list(self.scheduler.live_requests())
        owned = [b for r in live for b in r.block_ids]
        assert len(owned) == len(set(owned)) == self.kv.num_used_blocks
        for r in live:
            assert len(r.block_ids) == cdiv(r.num_computed_tokens, self.kv.block_size)
            assert not r.is_finished
        for r in self.scheduler.policy:
            assert r.block_ids == [] and r.num_computed_tokens == 0


def sched_ids(out: SchedulerOutput) -> list[str]:
    return [s.request_id for s in out.scheduled]


def waiting_ids(sched: Scheduler) -> list[str]:
    return [r.request_id for r in sched.policy]


# ---- basics ----------------------------------------------------------------------------------------


def test_empty_schedule():
    sim = CheckedSim(make_scheduler())
    out = sim.step()
    assert out.is_empty and out.preempted_ids == []
    assert out.num_batched_tokens == 0 and out.stats.num_free_blocks == 8


def test_single_request_prefill_then_decode():
    sim = CheckedSim(make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=16))
    a = sim.add("a", prompt_len=6, max_tokens=3)
    out = sim.step()
    (s,) = out.scheduled
    assert (s.request_id, s.start_pos, s.token_ids, s.block_ids) == ("a", 0, prompt_tokens(0, 6), [0, 1])
    assert s.will_sample and s.is_prefill
    assert out.num_prefills == 1 and out.num_decodes == 0
    out = sim.step()
    (s,) = out.scheduled
    assert (s.start_pos, s.token_ids, s.block_ids) == (6, [output_token(0, 0)], [0, 1])
    assert s.will_sample and not s.is_prefill
    assert out.num_prefills == 0 and out.num_decodes == 1
    out = sim.step()
    (s,) = out.scheduled
    assert (s.start_pos, s.block_ids) == (7, [0, 1])
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [output_token(0, k) for k in range(3)]
    assert sim.kv.num_used_blocks == 0
    assert sim.step().is_empty


def test_blocks_allocated_lazily_as_tokens_are_computed():
    # a request that may generate up to 100 tokens holds only the blocks of what it computed so far
    sim = CheckedSim(make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=4))
    a = sim.add("a", prompt_len=10, max_tokens=100)
    expected = {1: [0], 2: [0, 1], 3: [0, 1, 2]}  # prompt chunks of 4, 4, 2 tokens
    for step in range(1, 4):
        sim.step()
        assert a.block_ids == expected[step]
        assert sim.kv.num_used_blocks == len(expected[step])
    assert a.num_computed_tokens == 10
    # decodes: a fourth block only when token 13 is computed
    for computed, blocks in [(11, 3), (12, 3), (13, 4), (14, 4), (16, 4), (17, 5)]:
        while a.num_computed_tokens < computed:
            sim.step()
        assert len(a.block_ids) == blocks
        assert sim.kv.num_used_blocks == blocks
    assert a.block_ids == [0, 1, 2, 3, 4]
    sim.scheduler.finish_request(a, RequestStatus.FINISHED_STOPPED)
    assert a.block_ids == [] and sim.kv.num_used_blocks == 0
    sim.check_all_done()


def test_finished_blocks_are_reused_tail_first():
    sim = CheckedSim(make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32))
    sim.add("a", prompt_len=12, max_tokens=1)  # blocks 0, 1, 2; finishes after its first step
    sim.add("b", prompt_len=7, max_tokens=5)  # blocks 3, 4 (its 8th token still fits)
    out = sim.step()
    assert [s.block_ids for s in out.scheduled] == [[0, 1, 2], [3, 4]]
    assert sim.reqs["a"].is_finished and sim.kv.num_used_blocks == 2
    sim.add("c", prompt_len=16, max_tokens=1)
    out = sim.step()
    # free queue: 5 (never used), then a's blocks last-first
    assert sched_ids(out) == ["b", "c"]
    assert out.scheduled[1].block_ids == [5, 2, 1, 0]


# ---- budgets ---------------------------------------------------------------------------------------


def test_decodes_are_scheduled_before_new_prompts():
    sim = CheckedSim(make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=8))
    sim.add("a", prompt_len=6, max_tokens=10)
    assert sched_ids(sim.step()) == ["a"]
    sim.add("b", prompt_len=10, max_tokens=10)
    out = sim.step()
    # a's decode first; b gets the 7 tokens left of the budget
    assert [(s.request_id, s.start_pos, s.num_tokens, s.is_prefill, s.will_sample) for s in out.scheduled] == [
        ("a", 6, 1, False, True), ("b", 0, 7, True, False)]
    sim.add("c", prompt_len=2, max_tokens=10)
    out = sim.step()
    # running requests (a decode and b's prefill in progress) first, c gets the 4 tokens left
    assert [(s.request_id, s.start_pos, s.num_tokens) for s in out.scheduled] == [
        ("a", 7, 1), ("b", 7, 3), ("c", 0, 2)]
    out = sim.step()
    assert [(s.request_id, s.num_tokens, s.is_prefill) for s in out.scheduled] == [
        ("a", 1, False), ("b", 1, False), ("c", 1, False)]


def test_token_budget_is_shared_in_fcfs_order():
    sim = CheckedSim(make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=10))
    for rid in "abc":
        sim.add(rid, prompt_len=4, max_tokens=5)
    out = sim.step()
    # a and b whole, c the 2 tokens left
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 4), ("b", 4), ("c", 2)]
    assert out.num_batched_tokens == 10
    out = sim.step()
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 2)]


def test_max_num_seqs_limits_running_requests():
    sim = CheckedSim(make_scheduler(num_blocks=32, max_num_batched_tokens=64, max_num_seqs=2))
    sim.add("a", prompt_len=3, max_tokens=1)
    sim.add("b", prompt_len=3, max_tokens=3)
    sim.add("c", prompt_len=3, max_tokens=2)
    out = sim.step()
    assert sched_ids(out) == ["a", "b"]  # budget and blocks to spare, but only two sequences
    assert waiting_ids(sim.scheduler) == ["c"]
    assert sim.reqs["a"].is_finished
    assert sched_ids(sim.step()) == ["b", "c"]
    assert sched_ids(sim.step()) == ["b", "c"]
    assert sim.reqs["b"].is_finished and sim.reqs["c"].is_finished
    sim.check_all_done()


# ---- chunked prefill -------------------------------------------------------------------------------


def test_chunked_prefill_splits_long_prompt():
    sim = CheckedSim(make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4))
    sim.add("a", prompt_len=10, max_tokens=2)
    prompt = prompt_tokens(0, 10)
    chunks = []
    for _ in range(4):
        (s,) = sim.step().scheduled
        chunks.append((s.start_pos, s.token_ids, s.block_ids, s.will_sample, s.is_prefill))
    assert chunks == [
        (0, prompt[0:4], [0], False, True),
        (4, prompt[4:8], [0, 1], False, True),
        (8, prompt[8:10], [0, 1, 2], True, True),
        (10, [output_token(0, 0)], [0, 1, 2], True, False),
    ]
    sim.check_all_done()


def test_prompt_longer_than_budget_completes():
    sim = CheckedSim(make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=4))
    a = sim.add("a", prompt_len=30, max_tokens=3)
    sim.run()
    # 8 prefill steps (4 * 7 + 2 tokens; the last one samples the first token), then 2 decodes
    assert sim.steps == 10
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 3


def test_without_chunked_prefill_a_prompt_waits_for_the_whole_budget():
    sim = CheckedSim(make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8, chunked=False))
    sim.add("a", prompt_len=6, max_tokens=5)
    sim.add("b", prompt_len=4, max_tokens=5)
    sim.add("c", prompt_len=1, max_tokens=5)
    out = sim.step()
    # b needs 4 tokens, 2 are left: it waits, and c behind it waits too (FCFS)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 6)]
    assert out.num_batched_tokens == 6
    assert waiting_ids(sim.scheduler) == ["b", "c"]
    out = sim.step()
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 4), ("c", 1)]
    assert all(s.will_sample for s in out.scheduled)
    sim.run()

    # the same requests with chunked prefill: b's prompt is cut to the 2 tokens left
    sim = CheckedSim(make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8, chunked=True))
    sim.add("a", prompt_len=6, max_tokens=5)
    sim.add("b", prompt_len=4, max_tokens=5)
    sim.add("c", prompt_len=1, max_tokens=5)
    out = sim.step()
    assert [(s.request_id, s.num_tokens, s.will_sample) for s in out.scheduled] == [("a", 6, True), ("b", 2, False)]


def test_without_chunked_prefill_config_rejects_budget_below_max_model_len():
    config = EngineConfig(max_num_batched_tokens=8, enable_chunked_prefill=False, num_threads=1)
    with pytest.raises(ValueError, match="chunked prefill disabled"):
        config.finalize(16)


# ---- preemption ------------------------------------------------------------------------------------


def test_recompute_preemption_of_latest_arrival():
    # 4 blocks of 4 tokens; a and b take 2 blocks each, and a's 9th token needs a third
    sim = CheckedSim(make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16))
    a = sim.add("a", prompt_len=7, max_tokens=10)
    b = sim.add("b", prompt_len=7, max_tokens=10)
    out = sim.step()
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [("a", [0, 1]), ("b", [2, 3])]
    out = sim.step()  # both decode their 8th token: still 2 blocks each
    assert sched_ids(out) == ["a", "b"] and out.stats.num_free_blocks == 0
    c = sim.add("c", prompt_len=2, max_tokens=1)

    out = sim.step()
    assert out.preempted_ids == ["b"]
    assert sched_ids(out) == ["a"]
    assert a.block_ids == [0, 1, 3]  # b's blocks came back tail-first: 3 before 2
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and sim.scheduler.num_preemptions == 1
    assert b.output_token_ids == [output_token(1, 0), output_token(1, 1)]  # tokens are kept
    # b goes back in front of c; c (one block, and one is free) is not admitted in this step
    assert waiting_ids(sim.scheduler) == ["b", "c"]
    assert out.stats.num_free_blocks == 1 and out.stats.num_running == 1 and out.stats.num_waiting == 2
    assert c.status == RequestStatus.WAITING

    out = sim.step()
    # b needs 3 blocks for its 9 tokens, 1 is free: it waits, and so does c behind it
    assert sched_ids(out) == ["a"] and out.preempted_ids == []
    assert waiting_ids(sim.scheduler) == ["b", "c"]

    while not a.is_finished:
        out = sim.step()
        assert sched_ids(out) == ["a"]
    assert a.block_ids == [] and sim.kv.num_free_blocks == 4

    out = sim.step()
    # b recomputes its prompt and its 2 outputs in one prefill, then samples its 3rd token
    sb, sc = out.scheduled
    assert (sb.request_id, sb.start_pos, sb.is_prefill, sb.will_sample) == ("b", 0, True, True)
    assert sb.token_ids == prompt_tokens(1, 7) + [output_token(1, 0), output_token(1, 1)]
    assert sb.block_ids == [2, 3, 1]  # a's blocks [0, 1, 3, 2] came back as 2, 3, 1, 0
    assert (sc.request_id, sc.block_ids) == ("c", [0])
    sim.run()
    assert b.num_output_tokens == 10 and b.num_preemptions == 1


def test_victim_is_latest_arrival_even_if_it_is_the_requester():
    # a is admitted first but arrived later than b: when a needs a block, a is the one preempted
    sim = CheckedSim(make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16))
    a = sim.add("a", prompt_len=7, max_tokens=10, arrival_time=1.0)
    b = sim.add("b", prompt_len=4, max_tokens=10, arrival_time=0.0)
    out = sim.step()
    assert [(s.request_id, s.block_ids) for s in out.scheduled] == [("a", [0, 1]), ("b", [2])]
    out = sim.step()  # a's 8th token fits; b's 5th takes the last block
    assert b.block_ids == [2, 3] and out.stats.num_free_blocks == 0
    out = sim.step()
    assert out.preempted_ids == ["a"]
    assert sched_ids(out) == ["b"]  # b still runs in the same step
    assert a.num_computed_tokens == 0 and a.block_ids == []
    assert waiting_ids(sim.scheduler) == ["a"]
    sim.run()


def test_fcfs_victim_choice():
    policy = FCFSPolicy()
    reqs = [Request(str(i), [1], SamplingParams(), arrival_time=t) for i, t in enumerate([3.0, 5.0, 1.0, 5.0])]
    assert policy.choose_victim(reqs) is reqs[3]  # latest arrival; on a tie the one admitted last
    assert policy.choose_victim(reqs[:3]) is reqs[1]
    assert policy.choose_victim(reqs[2:3]) is reqs[2]


def test_preempted_request_goes_to_front_of_waiting_queue():
    policy = FCFSPolicy()
    a, b, c = (Request(rid, [1], SamplingParams()) for rid in "abc")
    policy.add(a)
    policy.add(b)
    policy.add_preempted(c)
    assert [r.request_id for r in policy] == ["c", "a", "b"]
    assert policy.pop() is c and policy.peek() is a and len(policy) == 2


def test_many_requests_under_memory_pressure_all_finish():
    # 6 blocks of 4 tokens for 8 requests that need up to 24 tokens each
    sim = CheckedSim(make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=8, max_num_seqs=8))
    for i in range(8):
        sim.add(f"r{i}", prompt_len=4 + 2 * i, max_tokens=20 - 2 * i)
    sim.run(max_steps=2000)
    assert sim.scheduler.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in sim.reqs.values())


# ---- aborts ----------------------------------------------------------------------------------------


def test_abort_waiting_request():
    sim = CheckedSim(make_scheduler(num_blocks=8, max_num_batched_tokens=4))
    a = sim.add("a", prompt_len=4, max_tokens=2)
    b = sim.add("b", prompt_len=4, max_tokens=2)
    sim.abort(b)
    assert waiting_ids(sim.scheduler) == ["a"]
    assert sched_ids(sim.step()) == ["a"]
    sim.run()
    assert a.status == RequestStatus.FINISHED_LENGTH and b.status == RequestStatus.FINISHED_ABORTED


def test_abort_mid_prefill_frees_blocks():
    sim = CheckedSim(make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4))
    a = sim.add("a", prompt_len=10, max_tokens=2)
    sim.step()
    sim.step()
    assert a.num_computed_tokens == 8 and a.block_ids == [0, 1] and a.num_output_tokens == 0
    sim.abort(a)
    assert sim.scheduler.running == [] and sim.kv.num_used_blocks == 0
    assert sim.step().is_empty
    sim.check_all_done()


def test_abort_decoding_and_preempted_requests():
    sim = CheckedSim(make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16))
    a = sim.add("a", prompt_len=7, max_tokens=10)
    b = sim.add("b", prompt_len=7, max_tokens=10)
    for _ in range(3):
        out = sim.step()
    assert out.preempted_ids == ["b"] and b.num_output_tokens == 2
    sim.abort(b)  # preempted, so waiting with outputs but no blocks
    assert waiting_ids(sim.scheduler) == []
    sim.abort(a)  # decoding, with 3 blocks
    assert sim.kv.num_used_blocks == 0
    sim.check_all_done()


# ---- randomized runs -------------------------------------------------------------------------------

CONFIGS = {
    # name: (scheduler kwargs, max prompt len, max total len)
    "chunked-tight-memory": (dict(num_blocks=16, block_size=4, max_num_batched_tokens=16, max_num_seqs=6), 40, 64),
    "chunked-roomy": (dict(num_blocks=64, block_size=4, max_num_batched_tokens=24, max_num_seqs=8), 40, 64),
    "chunked-odd-block-size": (dict(num_blocks=11, block_size=3, max_num_batched_tokens=7, max_num_seqs=5), 25, 33),
    "chunked-block-size-1": (dict(num_blocks=30, block_size=1, max_num_batched_tokens=9, max_num_seqs=4), 20, 30),
    "no-chunking": (dict(num_blocks=10, block_size=4, max_num_batched_tokens=32, max_num_seqs=6, chunked=False), 24, 32),
}


def random_run(name: str, seed: int, num_requests: int, abort_prob: float = 0.0) -> tuple[Sim, Counter]:
    kwargs, max_prompt, max_total = CONFIGS[name]
    rng = random.Random(seed)
    sim = CheckedSim(make_scheduler(**kwargs))
    pending = []
    for i in range(num_requests):
        prompt_len = rng.randint(1, max_prompt)
        pending.append((f"r{i}", prompt_len, rng.randint(1, max_total - prompt_len)))
    aborted: Counter = Counter()

    def kind_of(req: Request) -> str:
        if req.status == RequestStatus.WAITING:
            return "preempted" if req.num_preemptions else "waiting"
        if req.num_computed_tokens < req.num_prompt_tokens:
            return "mid-prefill"
        if req.num_computed_tokens < req.num_tokens - 1:
            return "mid-recompute"  # resumed after a preemption, its outputs not all computed again
        return "decoding"

    def maybe_abort() -> None:
        if rng.random() >= abort_prob:
            return
        by_kind: dict[str, list[Request]] = {}
        for req in sim.scheduler.live_requests():
            by_kind.setdefault(kind_of(req), []).append(req)
        if not by_kind:
            return
        # a kind first, so that rare states (mid-prefill, just preempted) are hit too
        kind = rng.choice(sorted(by_kind))
        sim.abort(rng.choice(by_kind[kind]))
        aborted[kind] += 1

    while pending or sim.scheduler.num_unfinished:
        assert sim.steps < 5000, "the scheduler made no progress"
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            if pending:
                sim.add(*pending.pop(0))
        maybe_abort()
        sim.step()
        maybe_abort()
    sim.check_all_done()
    return sim, aborted


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_run(name, seed):
    sim, _ = random_run(name, seed, num_requests=80)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in sim.reqs.values())
    assert sim.steps >= 100
    if name != "chunked-roomy":
        assert sim.scheduler.num_preemptions > 0
    if sim.scheduler.chunked_prefill:
        assert sim.num_chunked_prefills > 0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_run_with_aborts(name, seed):
    sim, aborted = random_run(name, seed, num_requests=80, abort_prob=0.1)
    assert aborted["waiting"] > 0 and aborted["decoding"] > 0
    if sim.scheduler.chunked_prefill:
        assert aborted["mid-prefill"] > 0
    statuses = Counter(r.status for r in sim.reqs.values())
    assert statuses[RequestStatus.FINISHED_ABORTED] == sum(aborted.values())
    assert statuses[RequestStatus.FINISHED_LENGTH] > 0


def test_randomized_aborts_hit_preempted_requests():
    # across the tight-memory runs, some aborted requests were waiting after a preemption
    total: Counter = Counter()
    for seed in range(5):
        _, aborted = random_run("chunked-tight-memory", seed, num_requests=80, abort_prob=0.2)
        total += aborted
    assert total["preempted"] > 0
