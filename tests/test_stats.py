"""One definition of the queue and cache figures: the scheduler's SchedulerStats snapshot.

A swapped-out request is the case where two definitions of "waiting" used to disagree (the engine
counted it as waiting, the scheduler did not): every reader of the figures must report the same
numbers for it.
"""
from __future__ import annotations

import random

from prometheus_client.parser import text_string_to_metric_families

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.metrics import PrometheusMetrics
from tokenmill.engine.trace import read_trace
from tokenmill.sim.simulator import Arrival, CostModel, simulate
from tokenmill.workload import WorkloadRecord

# 16 blocks of 16 tokens for 8 prompts of 20-60 tokens: preemption (swap) within a few steps, long
# before any request ends (150 tokens each), so the step that swaps finishes no one.
SETTINGS = dict(max_model_len=256, enable_admission_control=False, enable_prefix_caching=False,
                preemption_mode="swap", num_threads=1)
MAX_TOKENS = 150


def _prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(20, 60))] for _ in range(8)]


def _gauges(metrics: PrometheusMetrics) -> dict[str, float]:
    return {s.name.removeprefix("tokenmill:"): s.value
            for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}


def test_a_swapped_request_is_reported_alike_by_every_consumer(tiny_llama_dir, tmp_path, capsys):
    trace = tmp_path / "engine.jsonl"
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=16 * 16 * 512, async_scheduling=False,
              log_steps=True, trace_path=str(trace), **SETTINGS)
    engine = llm.llm_engine
    assert engine.num_total_blocks == 16
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        # NOTE: one arrival time for all, as the simulator's "all at once" below: the victim choice
        # (the latest arrival) then breaks ties the same way in both.
        engine.add_request(str(i), {"prompt_token_ids": p}, params, arrival_time=0.0)
    while engine.stats().scheduler.num_swapped == 0:
        engine.step()
    stats = engine.stats().scheduler
    assert stats.num_swapped >= 1 and stats.num_running >= 1 and stats.num_preemptions >= 1
    assert stats.num_running + stats.num_waiting + stats.num_swapped == len(prompts)

    # The step trace and the step log: the record of the step that swapped.
    record = read_trace(str(trace))[-1]
    assert record.preempted and not record.finished
    assert (record.num_running, record.num_waiting, record.num_swapped, record.free_blocks,
            record.cached_blocks) == (stats.num_running, stats.num_waiting, stats.num_swapped,
                                      stats.num_free_blocks, stats.num_cached_blocks)
    log_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"running {stats.num_running:3d} waiting {stats.num_waiting:3d} swapped {stats.num_swapped:3d} "
            f"| free blocks {stats.num_free_blocks:5d}") in log_line

    # /metrics.
    metrics = PrometheusMetrics("tiny", engine.stats)
    gauges = _gauges(metrics)
    assert gauges["num_requests_running"] == stats.num_running
    assert gauges["num_requests_waiting"] == stats.num_waiting
    assert gauges["num_requests_swapped"] == stats.num_swapped
    assert gauges["kv_cache_usage_perc"] == stats.num_used_blocks / 16
    assert gauges["num_preemptions_total"] == stats.num_preemptions

    # The server's queue limit (503): the swapped request does not hold a place in the queue.
    server_engine = AsyncLLMEngine(engine)
    server_engine.max_queued_requests = stats.num_waiting + 1
    assert not server_engine.queue_is_full()
    server_engine.max_queued_requests = stats.num_waiting
    assert server_engine.queue_is_full()

    while engine.has_unfinished_requests():
        engine.step()
    engine.close()
    engine.check_integrity()

    # The simulator runs the same scheduler on the same requests: the same figures, step by step.
    sim_trace = tmp_path / "sim.jsonl"
    arrivals = [Arrival(0.0, WorkloadRecord(p, MAX_TOKENS), p) for p in prompts]
    result = simulate(arrivals, EngineConfig(**SETTINGS), num_blocks=16, cost_model=CostModel(0.01, 0.0, 0.0),
                      num_host_blocks=1000, trace_path=str(sim_trace))
    final = engine.stats().scheduler
    assert result.num_preemptions == final.num_preemptions
    assert result.num_used_blocks_at_end == final.num_used_blocks == 0

    def figures(records):
        return [(r.step, [(s["request_id"], s["num_tokens"]) for s in r.scheduled], r.preempted, r.finished,
                 r.num_running, r.num_waiting, r.num_swapped, r.free_blocks, r.cached_blocks) for r in records]

    assert figures(read_trace(str(sim_trace))) == figures(read_trace(str(trace)))
