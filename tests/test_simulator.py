"""Scheduling simulator (`tokenmill simulate`) and the cost-model fit (`tokenmill bench calibrate`)."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from tokenmill.config import EngineConfig
from tokenmill.core.policy import POLICIES
from tokenmill.engine.trace import StepRecord, read_trace
from tokenmill.entrypoints.cli import main
from tokenmill.sim.calibrate import calibration_plan, fit_cost_model
from tokenmill.sim.simulator import CostModel, make_arrivals, percentile, simulate
from tokenmill.workload import WorkloadRecord, load_workload


def _workload(n: int, seed: int = 0, prompt=(8, 96), output=(2, 24), tenants: int = 1) -> list[WorkloadRecord]:
    rng = random.Random(seed)
    return [WorkloadRecord([rng.randrange(100, 40000) for _ in range(rng.randint(*prompt))], rng.randint(*output),
                           priority=rng.randint(0, 3), tenant=f"t{i % tenants}") for i in range(n)]


def _config(**kw) -> EngineConfig:
    kw.setdefault("num_threads", 1)
    return EngineConfig(**kw)


def test_one_request_by_hand():
    # prompt 10, 3 outputs; step = 0.01 + 0.001 * tokens + 0.0001 * context
    arrivals = make_arrivals([WorkloadRecord(list(range(100, 110)), 3)], None, 1.0, seed=0)
    r = simulate(arrivals, _config(), num_blocks=8, cost_model=CostModel(0.01, 0.001, 0.0001))
    step1 = 0.01 + 0.001 * 10 + 0.0001 * 10  # the prompt: 10 tokens, context 10 -> first token
    step2 = 0.01 + 0.001 * 1 + 0.0001 * 11  # decode, context 11
    step3 = 0.01 + 0.001 * 1 + 0.0001 * 12  # decode, context 12 -> third token, done
    (req,) = r.requests
    assert r.num_steps == 3 and r.num_preemptions == 0
    assert req.queue_time == 0.0
    assert req.time_to_first_token == pytest.approx(step1)
    assert req.e2e_latency == pytest.approx(step1 + step2 + step3)
    assert req.time_per_output_token == pytest.approx((step2 + step3) / 2)
    s = r.summary()
    assert s["sim_time_s"] == pytest.approx(step1 + step2 + step3)
    assert s["throughput_req_s"] == pytest.approx(1 / (step1 + step2 + step3))
    assert s["throughput_out_tok_s"] == pytest.approx(3 / (step1 + step2 + step3))
    assert s["ttft"] == {k: pytest.approx(step1) for k in ("mean", "p50", "p95", "p99")}
    assert s["mean_batch_size"] == 1 and s["mean_tokens_per_step"] == pytest.approx(12 / 3)


def test_two_requests_share_the_budget_by_hand():
    # Budget 8 tokens, 1 s per step. Step 1: A's 6 prompt tokens + 2 of B's (chunked) -> A's first
    # token. Step 2: A decodes (its last token: done at t=2) + B's last 2 prompt tokens -> B's first
    # token at t=2. Step 3: B decodes -> done at t=3.
    records = [WorkloadRecord([1] * 6, 2), WorkloadRecord([2] * 4, 2)]
    r = simulate(make_arrivals(records, None, math.inf, 0), _config(max_num_batched_tokens=8), 16,
                 CostModel(1.0, 0.0, 0.0))
    a, b = r.requests
    assert (a.queue_time, a.time_to_first_token, a.e2e_latency) == (0, 1, 2)
    assert (b.queue_time, b.time_to_first_token, b.e2e_latency) == (0, 2, 3)
    s = r.summary()
    assert s["steps"] == 3 and s["sim_time_s"] == 3 and s["throughput_req_s"] == pytest.approx(2 / 3)
    assert s["ttft"]["mean"] == 1.5 and s["ttft"]["p50"] == 1.5
    assert s["ttft"]["p95"] == pytest.approx(1.95) and s["ttft"]["p99"] == pytest.approx(1.99)
    assert s["e2e"]["mean"] == 2.5 and s["mean_tokens_per_step"] == 4


def test_queue_time_of_a_late_arrival():
    # max_num_seqs=1: the second request waits for the first to finish.
    records = [WorkloadRecord([1] * 4, 3), WorkloadRecord([2] * 4, 1)]
    r = simulate(make_arrivals(records, None, math.inf, 0), _config(max_num_seqs=1), 16, CostModel(1.0, 0.0, 0.0))
    a, b = r.requests
    assert (a.queue_time, a.e2e_latency) == (0, 3)
    assert (b.queue_time, b.time_to_first_token, b.e2e_latency, b.time_per_output_token) == (3, 4, 4, None)


def test_percentile_matches_numpy():
    rng = random.Random(5)
    for n in (1, 2, 7, 100):
        values = sorted(rng.random() for _ in range(n))
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_arrivals_are_poisson_and_seeded():
    records = _workload(50)
    a1 = make_arrivals(records, 2000, 4.0, seed=3)
    a2 = make_arrivals(records, 2000, 4.0, seed=3)
    assert [(a.time, a.prompt_token_ids) for a in a1] == [(a.time, a.prompt_token_ids) for a in a2]
    assert a1[0].time == 0.0 and all(x.time <= y.time for x, y in zip(a1, a1[1:]))
    gaps = [y.time - x.time for x, y in zip(a1, a1[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert [a.time for a in make_arrivals(records, 2000, 4.0, seed=4)] != [a.time for a in a1]
    # The first pass replays the file in order; later passes are new prompts of the same shapes.
    assert [a.prompt_token_ids for a in a1[:50]] == [r.prompt_token_ids for r in records]
    span = max(max(r.prompt_token_ids) for r in records) + 1
    by_shape = {(len(r.prompt_token_ids), r.max_tokens) for r in records}
    for a in a1[50:]:
        assert (len(a.prompt_token_ids), a.record.max_tokens) in by_shape
        assert min(a.prompt_token_ids) >= span
    assert all(a.time == 0.0 for a in make_arrivals(records, 100, math.inf, 0))
    with pytest.raises(ValueError, match="arrival_rate"):
        make_arrivals(records, 10, 0.0, 0)


def test_deterministic_for_a_seed_with_preemptions():
    records = _workload(60, seed=1, output=(8, 64))

    def run(seed):
        arrivals = make_arrivals(records, 300, 20.0, seed)
        return simulate(arrivals, _config(enable_admission_control=False), num_blocks=40,
                        cost_model=CostModel(0.01, 1e-4, 1e-6)).summary()

    first = run(7)
    assert first["preemptions"] > 0
    assert run(7) == first
    assert run(8) != first


def test_budgets_respected_and_all_finish(tmp_path):
    records = _workload(80, seed=2, prompt=(8, 200), output=(1, 40))
    arrivals = make_arrivals(records, 400, 50.0, 0)
    trace = tmp_path / "sim.jsonl"
    r = simulate(arrivals, _config(max_num_batched_tokens=64, max_num_seqs=8, enable_admission_control=False),
                 num_blocks=48, cost_model=CostModel(0.01, 1e-4, 1e-6), trace_path=str(trace))
    steps = read_trace(str(trace))
    assert len(steps) == r.num_steps
    assert all(0 < s.num_tokens <= 64 and len(s.scheduled) <= 8 for s in steps)
    assert all(a.t_end == b.t_start for a, b in zip(steps, steps[1:])
               if a.num_running > len(a.finished) or a.num_waiting)  # no idle gap while work is left
    assert r.num_preemptions == sum(len(s.preempted) for s in steps) > 0
    assert len(r.requests) == 400
    assert sorted(rid for s in steps for rid in s.finished) == sorted(str(i) for i in range(400))
    for req, a in zip(r.requests, arrivals):  # requests come back in arrival order
        assert req.arrival_time == a.time
        assert req.num_generation_tokens == a.record.max_tokens
        assert 0 <= req.queue_time <= req.time_to_first_token <= req.e2e_latency
    assert steps[-1].num_running == len(steps[-1].finished) and steps[-1].num_waiting == 0
    assert r.num_used_blocks_at_end == 0


def test_every_policy_runs_the_same_workload():
    records = _workload(40, seed=3, tenants=3)
    for name in POLICIES:
        arrivals = make_arrivals(records, 200, 30.0, 0)
        r = simulate(arrivals, _config(scheduling_policy=name), 64, CostModel(0.01, 1e-4, 1e-6))
        assert len(r.requests) == 200 and r.policy == name
        assert sum(q.num_generation_tokens for q in r.requests) == sum(a.record.max_tokens for a in arrivals)


def test_ten_thousand_requests():
    records = _workload(100, seed=4, prompt=(16, 64), output=(2, 12))
    r = simulate(make_arrivals(records, 10_000, 200.0, 0), _config(), 1024, CostModel(0.005, 2e-5, 1e-7))
    assert len(r.requests) == 10_000
    s = r.summary()
    assert s["throughput_req_s"] > 0 and s["ttft"]["p99"] >= s["ttft"]["p50"] > 0


def test_kv_too_small_is_a_clear_error():
    arrivals = make_arrivals([WorkloadRecord([1] * 40, 30)], None, 1.0, 0)
    with pytest.raises(ValueError, match="KV blocks"):
        simulate(arrivals, _config(), num_blocks=2)


def test_workload_file_errors(tmp_path):
    path = tmp_path / "w.jsonl"
    cases = [
        ('{"prompt_token_ids": [1, 2], "max_tokens": 0}', r"w.jsonl:1: max_tokens must be a positive integer, got 0"),
        ('{"prompt_token_ids": [1, 2]}', r"w.jsonl:1: max_tokens must be a positive integer, got None"),
        ('\n{"prompt_token_ids": [], "max_tokens": 3}', r"w.jsonl:2: a request needs prompt_token_ids \(a non-empty list of integers\)$"),
        ('{"prompt": "hi", "max_tokens": 3}', r"w.jsonl:1: a request needs prompt_token_ids"),
        ('{"prompt_token_ids": [1, "2"], "max_tokens": 3}', r"w.jsonl:1: a request needs"),
        ('{"prompt_token_ids": [1], "max_tokens": 3, "priority": "high"}', r"w.jsonl:1: priority must be an integer, got 'high'"),
        ('[1, 2]', r"w.jsonl:1: a line must be a JSON object"),
        ('{"prompt_token_ids": [1], ', r"w.jsonl:1: not JSON"),
        ('\n\n', r"w.jsonl: the workload has no requests"),
    ]
    for text, message in cases:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_workload(str(path))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt_token_ids": [1, 2], "max_tokens": 3, "priority": 2, "tenant": "x"}\n\n'
                    '{"prompt_token_ids": [5], "max_tokens": 1}\n')
    assert load_workload(str(good)) == [WorkloadRecord([1, 2], 3, 2, "x"), WorkloadRecord([5], 1, 0, "default")]
    assert load_workload(str(good), num_requests=1) == [WorkloadRecord([1, 2], 3, 2, "x")]


def test_workload_text_prompts(tmp_path):
    """Text prompts only where the reader allows them (the serving benchmark)."""
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 4}\n{"prompt_token_ids": [7, 8], "max_tokens": 2}\n')
    records = load_workload(str(path), allow_text=True)
    assert records == [WorkloadRecord(None, 4, prompt="Hello there"), WorkloadRecord([7, 8], 2)]
    assert [r.prompt_len for r in records] == [0, 2]
    with pytest.raises(ValueError, match=r"w.jsonl:1: a request needs prompt_token_ids \(a non-empty list of integers\)$"):
        load_workload(str(path))
    path.write_text('{"prompt": "", "max_tokens": 4}\n')
    with pytest.raises(ValueError, match=r"or prompt \(text\)"):
        load_workload(str(path), allow_text=True)


def test_cli_simulate_is_deterministic(tmp_path, capsys):
    wl = tmp_path / "wl.jsonl"
    wl.write_text("".join(json.dumps({"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens,
                                      "tenant": r.tenant, "priority": r.priority}) + "\n"
                          for r in _workload(30, seed=6, tenants=2)))
    cost = tmp_path / "cost.json"
    CostModel(0.01, 1e-4, 1e-6).save(str(cost))
    argv = ["simulate", "--workload", str(wl), "--policy", "all", "--arrival-rate", "40", "--num-requests", "500",
            "--kv-blocks", "64", "--seed", "3", "--cost-model", str(cost), "--json", str(tmp_path / "out.json")]
    assert main(argv) == 0
    out1 = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == out1
    for name in POLICIES:
        assert f"policy {name}: 500 requests" in out1
    table = out1.splitlines()[-len(POLICIES) - 1:]
    assert table[0].split()[:3] == ["policy", "req/s", "out"]
    assert [line.split()[0] for line in table[1:]] == list(POLICIES)
    assert "a=0.01 s" in out1
    figures = json.loads((tmp_path / "out.json").read_text())
    assert [f["policy"] for f in figures] == list(POLICIES) and figures[0]["requests"] == 500


def test_fit_cost_model_recovers_coefficients():
    rng = random.Random(0)
    records = []
    for i in range(40):
        sched = [{"request_id": str(j), "num_tokens": rng.randint(1, 300), "num_computed_tokens": rng.randint(0, 900),
                  "phase": "prefill"} for j in range(rng.randint(1, 12))]
        tokens = sum(s["num_tokens"] for s in sched)
        context = sum(s["num_tokens"] + s["num_computed_tokens"] for s in sched)
        records.append(StepRecord(step=i + 1, t_start=100.0 + i, t_end=100.0 + i + 0.02 + 3e-4 * tokens + 2e-6 * context,
                                  scheduled=sched))
    cost, info = fit_cost_model(records)
    assert (cost.a, cost.b, cost.c) == pytest.approx((0.02, 3e-4, 2e-6), rel=1e-6)
    assert info["steps"] == 40 and info["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fit_cost_model(records[:2])
    assert all(p + o < 200 for batch in calibration_plan(200) for p, o in batch)


def test_cli_bench_calibrate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cost.json"
    trace = tmp_path / "cal.jsonl"
    rc = main(["bench", "calibrate", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-model-len", "512",
               "--kv-cache-memory", str(16 << 20), "--num-threads", "1", "--trace", str(trace), "--out", str(out)])
    assert rc == 0
    cost = CostModel.load(str(out))
    assert set(json.loads(out.read_text())) == {"a", "b", "c"}
    assert all(math.isfinite(v) for v in (cost.a, cost.b, cost.c))
    printed = capsys.readouterr().out
    steps = int(printed.split("fitted on ")[1].split()[0])
    assert 100 < steps < len(read_trace(str(trace)))  # every step after the warm-up
