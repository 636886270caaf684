"""`tokenmill bench profile`: where one decode step's time goes, at the batch sizes asked.

For each batch size N the engine takes the first N requests of the workload (greedy, ignore_eos,
final outputs only as LLM.generate asks for them, with room to keep decoding), steps until all N
are decoding together (no prompt chunk left), and then times `--steps` decode steps twice:

  * plain, for the whole step as the engine runs it;
  * with a wall clock around every part of it: the scheduler, the model's projections (every
    linear layer but the LM head), the paged attention (the backend call: K/V write + attention),
    each fused kernel of tokenmill's CPU extension (RMSNorm + residual, SiLU x up, RoPE), the
    embedding, the LM head and the sampler. "rest of the forward" is the forward pass minus its
    timed parts (views, Python, small torch ops); "inputs and engine" is the step minus the
    forward, the sampler and the scheduler (building the input tensors, appending tokens, stop
    checks, outputs). Overlap scheduling is off unless asked for, so that the parts partition the step.
    Where the model runs its layers as one C++ call (models/layers/decoder_stack.py), that call
    times its own parts (norms, projections, RoPE, attention, SiLU x up) with the same names, and
    "rest of the forward" is what is left between them.

Besides the table it prints the attention's effective read bandwidth (the K/V bytes of every
context token, every layer, per second of attention) next to the machine's own (a large float32
tensor summed, and copied, with every thread), and the projections' TFLOP/s.
"""
from __future__ import annotations

import functools
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.entrypoints.allocator import tcmalloc_loaded
from tokenmill.workload import load_workload

# The extension's functions -> the part of the step they are timed under.
KERNEL_PARTS = {"silu_and_mul": "silu_and_mul", "fused_add_rms_norm": "RMSNorm (+ residual)",
                "rms_norm": "RMSNorm (+ residual)", "rotary_embedding": "RoPE"}
PART_ORDER = ["paged attention", "projections", "silu_and_mul", "LM head", "sampler", "RMSNorm (+ residual)",
              "RoPE", "embedding", "rest of the forward", "inputs and engine", "scheduler"]


@dataclass
class StepTimes:
    """Accumulated seconds per part over the timed steps, plus what the rates need."""
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    gemm_flops: float = 0.0

    def add(self, part: str, dt: float) -> None:
        self.seconds[part] += dt


class _TimedOps:
    """Stands in for the extension module: each function call is timed under its part."""

    def __init__(self, ops, times: StepTimes) -> None:
        self._ops, self._times = ops, times

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        part = KERNEL_PARTS.get(name)
        if part is None or not callable(fn):
            return fn

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._times.add(part, time.perf_counter() - t0)
        return timed


def _timed(fn, times: StepTimes, part: str, flops=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.add(part, time.perf_counter() - t0)
            if flops is not None:
                times.gemm_flops += flops(*args)
    return wrapper


class _TimedStack:
    """Stands in for the model's DecoderStack: each call's own part timings and GEMM flops go to times."""

    def __init__(self, stack, times: StepTimes) -> None:
        self._stack, self._times = stack, times
        self.takes = stack.takes

    def __call__(self, x, *args):
        self._stack.timings = seconds = torch.zeros(len(self._stack.PARTS), dtype=torch.float64)
        try:
            return self._stack(x, *args)
        finally:
            self._stack.timings = None
            for part, s in zip(self._stack.PARTS, seconds.tolist()):
                self._times.add(part, s)
            self._times.gemm_flops += self._stack.gemm_flops_per_token * x.shape[0]


@contextmanager
def instrumented(engine, times: StepTimes):
    """Time every part of `engine`'s steps into `times` (restored on exit)."""
    runner = engine.runner
    model = runner.model
    undo: list[tuple[object, str, object, bool]] = []

    def patch(obj, name, value):
        undo.append((obj, name, getattr(obj, name), name in vars(obj)))
        setattr(obj, name, value)

    for module in model.modules():
        if getattr(module, "ops", None) is not None:
            patch(module, "ops", _TimedOps(module.ops, times))
    lm_head = getattr(model, "lm_head", None)
    for module in model.modules():
        if module is lm_head:
            patch(module, "forward", _timed(module.forward, times, "LM head"))
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children()):
            per_row = 2 * module.in_features * module.out_features
            patch(module, "forward", _timed(module.forward, times, "projections", lambda x, f=per_row: f * x.shape[0]))
        elif isinstance(module, nn.Embedding):
            patch(module, "forward", _timed(module.forward, times, "embedding"))
    patch(runner.backend, "forward", _timed(runner.backend.forward, times, "paged attention"))
    if getattr(model, "decoder_stack", None) is not None:
        patch(model, "decoder_stack", _TimedStack(model.decoder_stack, times))
    patch(runner, "model", _timed(model, times, "forward"))
    patch(runner, "sampler", _timed(runner.sampler, times, "sampler"))
    patch(engine.scheduler, "schedule", _timed(engine.scheduler.schedule, times, "scheduler"))
    patch(engine, "step", _timed(engine.step, times, "step"))
    try:
        yield
    finally:
        for obj, name, old, own in reversed(undo):
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def machine_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> dict[str, float]:
    """GB/s of a read-mostly pass (sum) and of a copy (read + write) over a float32 tensor of nbytes."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best_sum = min(best_sum, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
    return {"read_gb_s": nbytes / best_sum / 1e9, "copy_gb_s": 2 * nbytes / best_copy / 1e9}


def _kv_bytes_per_token(engine) -> int:
    """K and V bytes of one token over all layers (each layer's cache is [2, num_blocks, ...])."""
    caches = engine.runner.kv_caches
    per_layer = caches[0].numel() // (caches[0].shape[1] * engine.config.block_size)
    return len(caches) * per_layer * caches[0].element_size()


def profile_batch(llm, records, batch_size: int, steps: int) -> dict:
    """Bring `batch_size` requests to a steady decode batch, then time `steps` steps plain and instrumented."""
    from tokenmill import RequestOutputKind, SamplingParams

    engine = llm.llm_engine
    if len(records) < batch_size:
        raise ValueError(f"the workload has {len(records)} requests, fewer than the batch size {batch_size}")
    chosen = records[:batch_size]
    room = engine.config.max_model_len - max(len(r.prompt_token_ids) for r in chosen) - 1
    # Enough tokens to reach the steady batch (every prompt in) and time both passes.
    max_tokens = min(room, 2 * steps + sum(len(r.prompt_token_ids) for r in chosen)
                     // engine.config.max_num_batched_tokens + 8)
    if max_tokens < 2 * steps + 2:
        raise ValueError("max_model_len leaves too little room after the prompts for the steps asked")
    ids = [f"profile-{batch_size}-{i}" for i in range(batch_size)]
    # Final outputs only, as LLM.generate asks for them (no per-step RequestOutput per request).
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for rid, rec in zip(ids, chosen):
        engine.add_request(rid, {"prompt_token_ids": rec.prompt_token_ids}, params)
    seen: list = []
    schedule = engine.scheduler.schedule

    def watching():
        out = schedule()
        seen.append(out)
        return out
    engine.scheduler.schedule = watching
    try:
        while True:  # until a step is all decodes of all the requests
            seen.clear()
            engine.step()
            last = seen[-1] if seen else None
            if last is not None and len(last.scheduled) == batch_size and not any(s.is_prefill for s in last.scheduled):
                break
            if not engine.has_unfinished_requests():
                raise RuntimeError("the requests finished before a steady decode batch formed")
        plain = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            plain.append(time.perf_counter() - t0)
        context = [s.start_pos + s.num_tokens for s in seen[-1].scheduled]
        # Blocks several requests hold (a cached prompt prefix) are in memory once.
        bs = engine.config.block_size
        distinct = {(b, min(bs, c - i * bs)) for s, c in zip(seen[-1].scheduled, context)
                    for i, b in enumerate(s.block_ids[:(c + bs - 1) // bs])}
    finally:
        del engine.scheduler.schedule
    times = StepTimes()
    with instrumented(engine, times):
        for _ in range(steps):
            engine.step()
    engine.abort_request(ids)

    sec = {k: v / steps for k, v in times.seconds.items()}
    parts = {name: sec[name] for name in PART_ORDER if name in sec}
    inside_forward = sum(sec.get(p, 0.0) for p in ("paged attention", "projections", "LM head", "embedding",
                                                   *set(KERNEL_PARTS.values())))
    parts["rest of the forward"] = max(0.0, sec.get("forward", 0.0) - inside_forward)
    parts["inputs and engine"] = max(0.0, sec.get("step", 0.0) - sec.get("forward", 0.0) - sec.get("sampler", 0.0)
                                     - sec.get("scheduler", 0.0))
    kv_bytes = sum(context) * _kv_bytes_per_token(engine)
    kv_distinct = sum(n for _, n in distinct) * _kv_bytes_per_token(engine)
    attn = sec.get("paged attention", 0.0)
    proj = sec.get("projections", 0.0)
    step_plain = sorted(plain)[len(plain) // 2]
    gemm = proj + sec.get("LM head", 0.0)
    return {
        "batch_size": batch_size, "context_tokens": sum(context), "steps": steps,
        "step_ms": step_plain * 1e3, "step_instrumented_ms": sec.get("step", 0.0) * 1e3,
        "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        "non_gemm_ms": (sec.get("step", 0.0) - gemm) * 1e3,  # both from the instrumented steps
        "attention_gb_s": kv_bytes / attn / 1e9 if attn else None,
        "kv_bytes_per_step": kv_bytes,
        "kv_distinct_bytes_per_step": kv_distinct,
        "attention_distinct_gb_s": kv_distinct / attn / 1e9 if attn else None,
        "projection_tflop_s": times.gemm_flops / steps / proj / 1e12 if proj else None,
    }


def format_profile(results: list[dict], bandwidth: dict[str, float] | None, header: str) -> str:
    cols = [f"{r['batch_size']} req, {r['context_tokens'] / 1e3:.1f}k ctx" for r in results]
    width = max(24, *(len(c) for c in cols))
    lines = [header, f"{'part':<24}" + "".join(f" | {c:>{width}}" for c in cols)]

    def row(name, cells):
        lines.append(f"{name:<24}" + "".join(f" | {c:>{width}}" for c in cells))
    row("whole step", [f"{r['step_ms']:.1f} ms" for r in results])
    names = [n for n in PART_ORDER if any(n in r["parts_ms"] for r in results)]
    for name in names:
        cells = []
        for r in results:
            ms = r["parts_ms"].get(name)
            cells.append("-" if ms is None else f"{ms:.2f} ms {ms / r['step_instrumented_ms']:6.1%}")
        row(name, cells)
    row("non-GEMM (instrumented)", [f"{r['non_gemm_ms']:.1f} ms" for r in results])
    row("attention K/V attended", [f"{r['kv_bytes_per_step'] / 1e6:.0f} MB, {r['attention_gb_s']:.1f} GB/s"
                                   if r["attention_gb_s"] else "-" for r in results])
    if any(r["kv_distinct_bytes_per_step"] < r["kv_bytes_per_step"] for r in results):  # shared prefix blocks
        row("  distinct K/V blocks", [f"{r['kv_distinct_bytes_per_step'] / 1e6:.0f} MB, "
                                      f"{r['attention_distinct_gb_s']:.1f} GB/s" if r["attention_distinct_gb_s"]
                                      else "-" for r in results])
    row("projections", [f"{r['projection_tflop_s']:.3f} TFLOP/s" if r["projection_tflop_s"] else "-"
                        for r in results])
    lines.append("(shares are of the instrumented step: "
                 + ", ".join(f"{r['step_instrumented_ms']:.1f} ms" for r in results) + ")")
    if bandwidth:
        lines.append(f"machine: {bandwidth['read_gb_s']:.1f} GB/s read (sum), {bandwidth['copy_gb_s']:.1f} GB/s "
                     f"copy (read + write), {torch.get_num_threads()} threads")
    return "\n".join(lines)


def main(args, engine_kwargs: dict) -> int:
    from tokenmill import LLM

    records = load_workload(args.workload)
    sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    # The parts partition a step only when the forward runs on the step's own thread: overlap
    # scheduling stays off unless asked for (then the parts of two steps overlap in time).
    engine_kwargs = {**engine_kwargs, "async_scheduling": bool(engine_kwargs.get("async_scheduling"))}
    llm = LLM(**engine_kwargs)
    engine = llm.llm_engine
    results = [profile_batch(llm, records, n, args.steps) for n in sizes]
    bandwidth = None if args.skip_bandwidth else machine_bandwidth()
    config = engine.config
    header = (f"decode step profile: {config.model or 'default model'}, {str(config.torch_dtype).removeprefix('torch.')}, "
              f"KV cache {str(engine.runner.kv_caches[0].dtype).removeprefix('torch.')}, "
              f"attention backend {engine.runner.backend.name}, "
              f"layers {'in one C++ call' if getattr(engine.runner.model, 'decoder_stack', None) else 'in Python'}, "
              f"{torch.get_num_threads()} threads, "
              f"malloc {'tcmalloc' if tcmalloc_loaded() else 'glibc'}, median of {args.steps} plain steps"
              + (", overlap scheduling on (the parts of consecutive steps overlap)" if config.async_scheduling else ""))
    print(format_profile(results, bandwidth, header))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"results": results, "bandwidth": bandwidth, "engine_args": engine_kwargs}, f, indent=2)
    engine.close()
    return 0
