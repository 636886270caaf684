"""Scheduling policies and admission control, through the real Scheduler with a fake model."""
from __future__ import annotations

import random

import pytest
from helpers import Sim, make_scheduler

from tokenmill import LLM, SamplingParams
from tokenmill.core.policy import POLICIES, make_policy
from tokenmill.request import Request, RequestStatus


def make_sim(policy: str, num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64,
             admission: bool = False, aging: float = 50.0) -> Sim:
    """The scheduler under `policy` plus a fake model (helpers.Sim)."""
    return Sim(make_scheduler(num_blocks, block_size, budget, max_num_seqs, model_max_len=4096,
                              scheduling_policy=policy, sjf_aging_rate=aging, enable_admission_control=admission))


def test_policy_registry_and_bad_name():
    assert set(POLICIES) == {"fcfs", "priority", "sjf", "fair"}
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_policy("lifo")


def test_sjf_serves_the_short_job_first():
    sim = make_sim("sjf", max_num_seqs=1)
    sim.add("long", prompt_len=200, max_tokens=20, arrival_time=0.0)
    sim.add("short", prompt_len=5, max_tokens=2, arrival_time=0.001)
    sim.run()
    assert sim.finish_step["short"] < sim.first_step["long"]


def test_fcfs_serves_in_arrival_order():
    sim = make_sim("fcfs", max_num_seqs=1)
    sim.add("long", prompt_len=200, max_tokens=20, arrival_time=0.0)
    sim.add("short", prompt_len=5, max_tokens=2, arrival_time=0.001)
    sim.run()
    assert sim.finish_step["long"] < sim.first_step["short"]


@pytest.mark.parametrize("aging", [10.0, 0.0])
def test_sjf_aging_bounds_the_wait_of_a_long_job(aging):
    """A long job (size 110) under a stream of short jobs (size 4), one arriving per second, each
    taking 2 steps (= 2 s): shorts alone would keep it waiting forever. With aging rate r, only
    shorts arriving before t* = (110 - 4) / r can pass it: with r = 10, t* = 10.6 s, so at most the
    11 shorts of t = 0..10, i.e. it starts by step 22."""
    sim = make_sim("sjf", max_num_seqs=1, aging=aging, budget=256)
    sim.add("short0", prompt_len=2, max_tokens=2, arrival_time=0.0)
    sim.add("long", prompt_len=100, max_tokens=10, arrival_time=0.0)
    for t in range(1, 80):
        sim.add(f"short{t}", prompt_len=2, max_tokens=2, arrival_time=float(t))
        sim.step()
        if "long" in sim.first_step:
            break
    if aging:
        assert sim.first_step["long"] <= 22
        passed = [r for r in sim.first_step if r.startswith("short") and sim.first_step[r] < sim.first_step["long"]]
        assert all(sim.reqs[r].times.arrival_time < 10.6 for r in passed)
    else:
        assert "long" not in sim.first_step  # starved: the bound needs aging


def test_priority_order_and_preemption_of_lower_priority():
    sim = make_sim("priority", max_num_seqs=1)
    low = sim.add("low", prompt_len=8, max_tokens=20, priority=5, arrival_time=0.0)
    for _ in range(3):
        sim.step()
    assert low.status == RequestStatus.RUNNING
    sim.add("high", prompt_len=8, max_tokens=3, priority=0, arrival_time=1.0)
    sim.add("mid", prompt_len=8, max_tokens=3, priority=2, arrival_time=0.5)
    out = sim.step()
    # max_num_seqs is reached: the lowest-priority running request makes room for the best waiting one.
    assert out.preempted_ids == ["low"] and [s.request_id for s in out.scheduled] == ["high"]
    sim.run()
    assert sim.finish_step["high"] < sim.first_step["mid"] < sim.finish_step["low"]
    assert low.num_preemptions == 1


def test_priority_does_not_preempt_equal_priority():
    sim = make_sim("priority", max_num_seqs=1)
    a = sim.add("a", prompt_len=8, max_tokens=10, priority=1)
    sim.step()
    sim.add("b", prompt_len=8, max_tokens=2, priority=1, arrival_time=1.0)
    out = sim.step()
    assert out.preempted_ids == [] and a.status == RequestStatus.RUNNING


def test_priority_preempts_when_blocks_run_out():
    sim = make_sim("priority", num_blocks=6, max_num_seqs=4)
    low = sim.add("low", prompt_len=16, max_tokens=6, priority=3)  # 4 of the 6 blocks at once
    sim.step()
    assert low.status == RequestStatus.RUNNING
    high = sim.add("high", prompt_len=12, max_tokens=2, priority=0, arrival_time=1.0)
    out = sim.step()
    assert "low" in out.preempted_ids and "high" in [s.request_id for s in out.scheduled]
    sim.run()
    assert high.num_output_tokens == 2 and low.num_output_tokens == 6


def test_fair_round_robins_between_tenants():
    sim = make_sim("fair", max_num_seqs=1)
    for i in range(20):
        sim.add(f"heavy{i}", prompt_len=8, max_tokens=2, tenant="heavy", arrival_time=i * 0.01)
    sim.add("light", prompt_len=8, max_tokens=2, tenant="light", arrival_time=1.0)
    sim.run()
    order = sorted(sim.first_step, key=sim.first_step.get)
    assert order[:3] == ["heavy0", "light", "heavy1"]
    fcfs = make_sim("fcfs", max_num_seqs=1)
    for i in range(20):
        fcfs.add(f"heavy{i}", prompt_len=8, max_tokens=2, tenant="heavy", arrival_time=i * 0.01)
    fcfs.add("light", prompt_len=8, max_tokens=2, tenant="light", arrival_time=1.0)
    fcfs.run()
    assert sorted(fcfs.first_step, key=fcfs.first_step.get)[-1] == "light"


def test_fair_victim_comes_from_the_heaviest_tenant():
    policy = make_policy("fair")
    reqs = [Request(f"{t}{i}", [1, 2], SamplingParams(), tenant=t, arrival_time=i)
            for i, t in enumerate(["a", "b", "b", "a", "b"])]
    assert policy.choose_victim(reqs).request_id == "b4"
    assert policy.choose_victim(reqs[:4]).request_id == "a3"  # a and b tie at 2: latest arrival


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_finishes_a_random_workload_under_memory_pressure(policy):
    rng = random.Random(policy)
    sim = make_sim(policy, num_blocks=24, max_num_seqs=6, budget=32)
    for i in range(40):
        sim.add(f"r{i}", prompt_len=rng.randint(2, 30), max_tokens=rng.randint(1, 30), arrival_time=i * 0.1,
                priority=rng.randint(0, 3), tenant=rng.choice("xyz"))
    sim.run()
    assert len(sim.finish_step) == 40


def _pressure_run(admission: bool) -> tuple[Sim, float]:
    """64 requests (prompts 32-256, outputs 32-256 tokens) in 64 blocks of 16: a third of the total."""
    rng = random.Random(3)
    sim = make_sim("fcfs", num_blocks=64, block_size=16, max_num_seqs=32, budget=256, admission=admission)
    for i in range(64):
        sim.add(f"r{i}", prompt_len=rng.randint(32, 256), max_tokens=rng.randint(32, 256), arrival_time=i * 0.01)
    cost = 0.0
    while sim.scheduler.num_unfinished:
        # A step costs a fixed part plus a part per token, in the proportions of a CPU step.
        cost += 0.05 + 0.0017 * sim.step().num_batched_tokens
    return sim, cost


def test_admission_control_cuts_preemptions_without_losing_throughput():
    without, cost_without = _pressure_run(admission=False)
    with_ac, cost_with = _pressure_run(admission=True)
    assert without.scheduler.num_preemptions > 50
    assert with_ac.scheduler.num_preemptions == 0
    # Recomputing preempted requests costs more than the smaller batches admission control runs.
    assert cost_with < cost_without


@pytest.mark.parametrize("seed", range(6))
def test_admission_peak_check_is_exact(seed):
    """_peak_fits admits exactly when the brute-force peak of blocks fits: max over k of
    sum over requests alive at k's end (o_i >= o_k) of ceil((a_i + o_k) / block_size)."""
    rng = random.Random(seed)
    bs = 16
    sim = make_sim("fcfs", num_blocks=10_000, block_size=bs, max_num_seqs=64, budget=10_000, admission=False)
    for i in range(rng.randint(1, 12)):
        sim.add(f"r{i}", prompt_len=rng.randint(1, 200), max_tokens=rng.randint(1, 120))
    sim.step()
    for _ in range(rng.randint(0, 30)):
        sim.step()
    sched = sim.scheduler
    candidate = Request("c", list(range(rng.randint(1, 200))), SamplingParams(max_tokens=rng.randint(1, 120)))
    items = [(r.num_tokens, sched._expected_remaining_output(r)) for r in [*sched.running, candidate]]
    peak = max(sum(-(-(a + ok) // bs) for a, o in items if o >= ok) for _, ok in items)
    in_use = sum(len(r.block_ids) for r in sched.running)
    for free in (peak - in_use - 1, peak - in_use):  # one block short of the peak, then just enough
        sched.kv = _FreeBlocks(sched.kv, free)
        assert sched._peak_fits(candidate) == (free + in_use >= peak)


class _FreeBlocks:
    """A KVCacheManager stand-in that reports a chosen number of free blocks."""

    def __init__(self, kv, free: int) -> None:
        self.block_size, self.num_free_blocks = kv.block_size, free
        self.pool = kv.pool


def test_admission_control_learns_the_output_ratio():
    sim = make_sim("fcfs", admission=True)
    assert sim.scheduler.output_ratio == 1.0
    for i in range(10):
        req = sim.add(f"r{i}", prompt_len=4, max_tokens=40)
        sim.step()
        assert req.status == RequestStatus.RUNNING
        sim.scheduler.finish_request(req, RequestStatus.FINISHED_STOPPED)  # stopped after 1 of 40 tokens
    assert sim.scheduler.output_ratio == pytest.approx(0.9 ** 10 + (1 - 0.9 ** 10) * (1 / 40))
    assert sim.scheduler.kv.num_used_blocks == 0


def test_engine_sjf_on_the_real_engine(tiny_llama_dir):
    """The engine passes priority and tenant through; sjf serves the short prompt first."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=1,
              scheduling_policy="sjf")
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": list(range(100, 400))}, params)
    engine.add_request("short", {"prompt_token_ids": list(range(100, 110))}, params)
    done = []
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == ["short", "long"]
    engine.check_integrity()


def test_generate_passes_priorities(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=1,
              scheduling_policy="priority", enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(100 + 10 * i, 110 + 10 * i))} for i in range(3)]
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    order = sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert order == [1, 2, 0]
    with pytest.raises(ValueError, match="priority"):
        llm.generate(prompts, params, use_tqdm=False, priority=[0])
