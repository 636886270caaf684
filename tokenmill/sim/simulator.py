"""Scheduling simulator: the real Scheduler and KVCacheManager on a virtual clock, no model.

A workload (see tokenmill/workload.py: token-id prompts, max_tokens, optional priority and
tenant) arrives as a seeded Poisson process. Each step runs the real `schedule()`; the
model is replaced by a step-time cost model

    step time = a + b * (tokens in the step) + c * (context tokens of the scheduled requests)

where a request's context is num_computed_tokens before the step + its tokens in the step (what its
attention reads). Every scheduled request that samples gets one fake token and finishes at
max_tokens (as with ignore_eos). Times are virtual seconds, so a run is exactly reproducible for a
seed, and policies can be compared at loads this machine could never run for real.

Not modelled: swap transfer time, the engine's CPU overhead outside the step, stop tokens.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.timeline import write_arrivals
from tokenmill.engine.trace import StepRecord, TraceWriter
from tokenmill.outputs import RequestMetrics
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload import WorkloadRecord

_FAKE_TOKEN = 0


@dataclass(frozen=True)
class CostModel:
    """Seconds per step: a + b * tokens + c * context tokens."""
    a: float
    b: float
    c: float

    def step_time(self, num_tokens: int, num_context_tokens: int) -> float:
        return self.a + self.b * num_tokens + self.c * num_context_tokens

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            d = json.load(f)
        try:
            return cls(float(d["a"]), float(d["b"]), float(d["c"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cost model {path} must be a JSON object with numbers a, b, c") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)
            f.write("\n")


# NOTE: what `tokenmill bench calibrate --out cost_model.json` fitted on this project's machine with
# the engine's defaults (README, "Scheduling simulator": the setting and the quality of the fit).
# Refit it there when the engine's speed changes: these numbers are only as current as that run.
DEFAULT_COST_MODEL = CostModel(a=0.0273, b=0.00168, c=5.23e-6)


@dataclass
class Arrival:
    time: float
    record: WorkloadRecord
    prompt_token_ids: list[int]


def make_arrivals(records: list[WorkloadRecord], num_requests: int | None, arrival_rate: float,
                  seed: int) -> list[Arrival]:
    """Requests in arrival order: the records replayed in file order, then in seeded shuffles.

    The first request arrives at t=0, the rest after exponential gaps of mean 1/arrival_rate
    (arrival_rate=inf: all at once).
    NOTE: pass c over the records (c >= 1 when num_requests exceeds the file) shifts every token id
    by c * (max id + 1): a replayed copy is a new prompt of the same length, not a prefix-cache hit
    on its earlier copy, while prompts that share a prefix within one pass still share it.
    """
    if not arrival_rate > 0:
        raise ValueError(f"arrival_rate must be positive (inf: all at once), got {arrival_rate!r}")
    n = len(records) if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be positive, got {n!r}")
    rng = random.Random(seed)
    span = max(max(r.prompt_token_ids) for r in records) + 1
    order: list[tuple[int, WorkloadRecord]] = []
    cycle = 0
    while len(order) < n:
        batch = list(records)
        if cycle:
            rng.shuffle(batch)
        order.extend((cycle, r) for r in batch[:n - len(order)])
        cycle += 1
    arrivals, t = [], 0.0
    for i, (cycle, rec) in enumerate(order):
        if i and not math.isinf(arrival_rate):
            t += rng.expovariate(arrival_rate)
        ids = rec.prompt_token_ids if cycle == 0 else [tok + cycle * span for tok in rec.prompt_token_ids]
        arrivals.append(Arrival(t, rec, ids))
    return arrivals


@dataclass
class SimResult:
    policy: str
    requests: list[RequestMetrics]  # in arrival order
    num_steps: int
    sim_time: float  # virtual seconds from the first arrival to the last finish
    num_preemptions: int
    mean_batch_size: float
    mean_tokens_per_step: float
    prefix_cache_hit_rate: float
    num_used_blocks_at_end: int = 0  # KV blocks still held once every request finished (0 unless a leak)
    wall_time: float = 0.0  # real seconds the simulation took (not deterministic)
    schedule_time: float = 0.0  # of which inside Scheduler.schedule()
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Every figure of the run, deterministic for a seed (wall times left out)."""
        reqs = self.requests
        out_tokens = sum(r.num_generation_tokens for r in reqs)
        d = {"policy": self.policy, "requests": len(reqs), "steps": self.num_steps,
             "sim_time_s": self.sim_time, "preemptions": self.num_preemptions,
             "throughput_req_s": len(reqs) / self.sim_time if self.sim_time > 0 else 0.0,
             "throughput_out_tok_s": out_tokens / self.sim_time if self.sim_time > 0 else 0.0,
             "mean_batch_size": self.mean_batch_size, "mean_tokens_per_step": self.mean_tokens_per_step,
             "prefix_cache_hit_rate": self.prefix_cache_hit_rate}
        for name, values in (("queue_time", [r.queue_time for r in reqs]),
                             ("ttft", [r.time_to_first_token for r in reqs]), ("e2e", [r.e2e_latency for r in reqs]),
                             ("tpot", [r.time_per_output_token for r in reqs if r.time_per_output_token is not None])):
            d[name] = distribution(values)
        return d


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    s = sorted(values)
    return {"mean": sum(s) / len(s) if s else float("nan"), "p50": percentile(s, 50),
            "p95": percentile(s, 95), "p99": percentile(s, 99)}


def simulate(arrivals: list[Arrival], config: EngineConfig, num_blocks: int,
             cost_model: CostModel = DEFAULT_COST_MODEL, num_host_blocks: int = 0,
             trace_path: str | None = None) -> SimResult:
    """Run `arrivals` to completion through a fresh Scheduler built from `config`.

    `config.max_model_len` (None: the longest request of the workload) stands in for the model's
    context length; like the engine, a request stops at max_model_len. `num_host_blocks` is the
    swap space in blocks (preemption_mode="swap"). `trace_path` writes the engine's step trace, in
    virtual seconds, for `tokenmill trace show | plot`.
    """
    wall0 = time.perf_counter()
    longest = max(len(a.prompt_token_ids) + a.record.max_tokens for a in arrivals)
    config = config.finalize(config.max_model_len or longest)
    max_len = config.max_model_len
    too_long = next((a for a in arrivals if len(a.prompt_token_ids) >= max_len), None)
    if too_long is not None:
        raise ValueError(f"a prompt is {len(too_long.prompt_token_ids)} tokens long, but max_model_len is {max_len}")
    if num_blocks * config.block_size < min(longest, max_len):
        raise ValueError(f"{num_blocks} blocks of {config.block_size} tokens cannot hold the longest request "
                         f"({min(longest, max_len)} tokens): raise the number of KV blocks")
    scheduler = Scheduler.from_config(config, num_blocks, num_host_blocks if config.preemption_mode == "swap" else 0)
    run = _Run(arrivals, scheduler, cost_model, max_len, TraceWriter(trace_path) if trace_path else None)
    while len(run.finished) < len(arrivals):
        run.arrive()
        if not run.step():
            run.idle()
    if run.trace is not None:
        run.trace.close()
        write_arrivals(trace_path, {str(i): a.time for i, a in enumerate(arrivals)})
    stats = scheduler.make_stats()
    steps = run.num_steps
    return SimResult(
        policy=config.scheduling_policy, requests=sorted(run.finished, key=lambda r: r.arrival_time),
        num_steps=steps, sim_time=run.now - arrivals[0].time, num_preemptions=stats.num_preemptions,
        mean_batch_size=run.total_batch / steps if steps else 0.0,
        mean_tokens_per_step=run.total_tokens / steps if steps else 0.0,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate, num_used_blocks_at_end=stats.num_used_blocks,
        wall_time=time.perf_counter() - wall0, schedule_time=run.schedule_time,
        config={"num_blocks": num_blocks, "block_size": config.block_size, "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.max_num_batched_tokens, "cost_model": asdict(cost_model)})


class _Run:
    """One simulation on its virtual clock: requests arrive, steps run, requests finish."""

    def __init__(self, arrivals: list[Arrival], scheduler: Scheduler, cost_model: CostModel, max_model_len: int,
                 trace: TraceWriter | None) -> None:
        self.arrivals, self.scheduler, self.cost_model, self.trace = arrivals, scheduler, cost_model, trace
        self.max_model_len = max_model_len
        self.now = 0.0
        self.next_arrival = 0  # index into arrivals
        self.live: dict[str, Request] = {}
        self.finished: list[RequestMetrics] = []
        self.num_steps = self.total_batch = self.total_tokens = 0
        self.schedule_time = 0.0  # real seconds inside Scheduler.schedule()

    def arrive(self) -> None:
        """Queue every request that has arrived by now."""
        while self.next_arrival < len(self.arrivals) and self.arrivals[self.next_arrival].time <= self.now:
            a = self.arrivals[self.next_arrival]
            max_tokens = min(a.record.max_tokens, self.max_model_len - len(a.prompt_token_ids))
            req = Request(str(self.next_arrival), a.prompt_token_ids,
                          SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                          priority=a.record.priority, arrival_time=a.time, tenant=a.record.tenant)
            self.live[req.request_id] = req
            self.scheduler.add_request(req)
            self.next_arrival += 1

    def idle(self) -> None:
        """Nothing could be scheduled: wait for the next arrival."""
        if self.next_arrival >= len(self.arrivals):
            raise RuntimeError(f"the scheduler scheduled nothing with {len(self.live)} requests unfinished "
                               f"and no arrivals left (stuck at t={self.now:.3f} s)")
        self.now = max(self.now, self.arrivals[self.next_arrival].time)

    def step(self) -> bool:
        """One step: schedule, advance the clock by the cost model, hand each sampling request its fake
        token; False (and nothing done) if the scheduler had nothing to run."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.schedule_time += time.perf_counter() - t0
        if out.is_empty:
            return False
        num_tokens = context = 0
        for s in out.scheduled:
            num_tokens += s.num_tokens
            context += s.start_pos + s.num_tokens
            times = self.live[s.request_id].times
            if times.first_scheduled_time is None:
                times.first_scheduled_time = self.now
        t_start = self.now
        self.now += self.cost_model.step_time(num_tokens, context)
        self.num_steps += 1
        self.total_batch += len(out.scheduled)
        self.total_tokens += num_tokens
        done: list[str] = []
        for s in out.scheduled:
            if s.will_sample and self._sample(self.live[s.request_id]):
                done.append(s.request_id)
        if self.trace is not None:
            self.trace.write(StepRecord.of_step(self.num_steps, t_start, self.now, out, done))
        return True

    def _sample(self, req: Request) -> bool:
        """The request's token of this step; True if that ends it (max_tokens, as with ignore_eos)."""
        self.scheduler.append_token(req, _FAKE_TOKEN)
        times = req.times
        if times.first_token_time is None:
            times.first_token_time = self.now
        times.last_token_time = self.now
        if req.num_output_tokens < req.sampling_params.max_tokens:
            return False
        times.finished_time = self.now
        self.scheduler.finish_request(req, RequestStatus.FINISHED_LENGTH)
        del self.live[req.request_id]
        self.finished.append(RequestMetrics.of([req]))
        return True


# ---- report ----------------------------------------------------------------------------------------


def format_result(result: SimResult) -> str:
    s = result.summary()
    lines = [f"policy {s['policy']}: {s['requests']} requests, {s['steps']} steps, {s['sim_time_s']:.2f} s simulated",
             f"{'':14s}{'mean':>10s}{'p50':>10s}{'p95':>10s}{'p99':>10s}"]
    for key, label in (("queue_time", "queue (s)"), ("ttft", "TTFT (s)"), ("e2e", "E2E (s)")):
        d = s[key]
        lines.append(f"{label:14s}" + "".join(f"{d[k]:10.3f}" for k in ("mean", "p50", "p95", "p99")))
    d = s["tpot"]
    lines.append(f"{'TPOT (ms)':14s}" + "".join(f"{d[k] * 1e3:10.2f}" for k in ("mean", "p50", "p95", "p99")))
    lines.append(f"throughput {s['throughput_req_s']:.2f} req/s, {s['throughput_out_tok_s']:.1f} output tok/s | "
                 f"preemptions {s['preemptions']} | mean batch {s['mean_batch_size']:.1f} requests, "
                 f"{s['mean_tokens_per_step']:.1f} tokens | prefix cache hit rate {s['prefix_cache_hit_rate']:.1%}")
    return "\n".join(lines)


def format_comparison(results: list[SimResult]) -> str:
    """One row per policy: the headline figures side by side."""
    head = (f"{'policy':10s}{'req/s':>8s}{'out tok/s':>11s}{'queue mean':>12s}{'TTFT mean':>11s}{'TTFT p50':>10s}"
            f"{'TTFT p99':>10s}{'E2E mean':>10s}{'E2E p99':>10s}{'TPOT ms':>9s}{'preempt':>9s}")
    lines = [head]
    for r in results:
        s = r.summary()
        lines.append(f"{s['policy']:10s}{s['throughput_req_s']:8.2f}{s['throughput_out_tok_s']:11.1f}"
                     f"{s['queue_time']['mean']:12.3f}{s['ttft']['mean']:11.3f}{s['ttft']['p50']:10.3f}"
                     f"{s['ttft']['p99']:10.3f}{s['e2e']['mean']:10.3f}{s['e2e']['p99']:10.3f}"
                     f"{s['tpot']['mean'] * 1e3:9.2f}{s['preemptions']:9d}")
    return "\n".join(lines)
