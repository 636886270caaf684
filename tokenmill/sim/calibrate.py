"""Fit the simulator's cost model (step time = a + b * tokens + c * context) to the real engine.

The engine runs a fixed plan of batches that covers the shapes the simulator meets (one long
prompt, many short ones, mixed prefill and decode, long-context decodes, wide decode batches)
with a step trace on; each step after the warm-up is one sample of
(tokens in the step, context tokens, t_end - t_start), and a least-squares fit gives a, b, c.

NOTE: the fit weighs each step by 1 / its time (least relative error). Step times span orders of
magnitude (a one-token decode to a long prefill); unweighted, the few long prefill steps decide a
and b, and the many short decode steps, which dominate a simulated run, are fitted worst.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np

from tokenmill.engine.trace import StepRecord, read_trace
from tokenmill.sim.simulator import CostModel

# Rounds of (prompt tokens, output tokens) requests, each round run to completion on its own.
_PLAN = [
    [(1024, 16)],  # one long prompt, then decodes over a long context
    [(128, 32)] * 16,  # a full-budget prefill step, then 16-wide decodes
    "mixed",  # 48 requests of mixed sizes: prompt chunks and decodes in the same steps
    [(1536, 8)] * 4,  # chunked prefill, then decodes with ~6k context tokens per step
    [(32, 64)] * 64,  # wide decode batches over short contexts
]


def calibration_plan(max_model_len: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    rng = random.Random(seed)
    rounds = []
    for spec in _PLAN:
        if spec == "mixed":
            spec = [(rng.randint(16, 384), rng.randint(8, 48)) for _ in range(48)]
        # Fit a small max_model_len: shorten the prompt, keep the outputs.
        rounds.append([(max(1, min(p, max_model_len - o - 1)), o) for p, o in spec])
    return rounds


def step_samples(records: list[StepRecord]) -> np.ndarray:
    """Rows (tokens, context tokens, seconds) of each step."""
    rows = [(sum(s["num_tokens"] for s in r.scheduled),
             sum(s["num_computed_tokens"] + s["num_tokens"] for s in r.scheduled),
             r.t_end - r.t_start) for r in records if r.scheduled]
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def fit_cost_model(records: list[StepRecord]) -> tuple[CostModel, dict]:
    """Least squares of step time on (1, tokens, context), relative error (weights 1 / time).

    Also returns the sample count, R^2, RMSE and the median relative error of the fit.
    """
    data = step_samples(records)
    if len(data) < 3:
        raise ValueError(f"need at least 3 steps to fit a, b, c, got {len(data)}")
    x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    y = data[:, 2]
    w = 1.0 / np.maximum(y, 1e-6)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    pred = x @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    info = {"steps": len(data), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "rmse_s": (ss_res / len(data)) ** 0.5, "mean_step_s": float(y.mean()),
            "median_rel_err": float(np.median(np.abs(pred - y) * w))}
    return CostModel(*(float(c) for c in coef)), info


def run_calibration(engine_kwargs: dict, seed: int = 0, progress=print) -> list[StepRecord]:
    """Run the plan on a real engine; the trace records of every step after the warm-up."""
    from tokenmill import LLM, SamplingParams

    kwargs = dict(engine_kwargs)
    own_trace = not kwargs.get("trace_path")
    if own_trace:
        fd, kwargs["trace_path"] = tempfile.mkstemp(prefix="tokenmill-calibrate-", suffix=".jsonl")
        os.close(fd)
    try:
        llm = LLM(**kwargs)
        engine = llm.llm_engine
        vocab = engine.vocab_size
        rng = random.Random(seed)

        def run(batch: list[tuple[int, int]]) -> None:
            prompts = [{"prompt_token_ids": [rng.randrange(min(100, vocab - 1), max(vocab - 100, 1))
                                             for _ in range(p)]} for p, _ in batch]
            params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in batch]
            llm.generate(prompts, params, use_tqdm=False)

        # Warm-up: the first long sequence and the first full-budget step pay one-time costs.
        run([(max(1, min(p, engine.config.max_model_len - 3)), 2) for p in (1024, 512, 512)])
        warm_steps = engine.num_steps
        for i, batch in enumerate(calibration_plan(engine.config.max_model_len, seed)):
            progress(f"round {i + 1}: {len(batch)} requests, {sum(p for p, _ in batch)} prompt tokens, "
                     f"{sum(o for _, o in batch)} output tokens")
            run(batch)
        llm.llm_engine.close()
        return [r for r in read_trace(kwargs["trace_path"]) if r.step > warm_steps]
    finally:
        if own_trace:
            os.unlink(kwargs["trace_path"])
