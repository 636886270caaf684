"""Admission control on a memory-tight workload: preemptions and throughput with it off and on.

    .venv/bin/tokenmill bench workload --n 48 --seed 5 --out wl_tight.jsonl
    .venv/bin/python benchmarks/admission_control.py --workload wl_tight.jsonl --kv-blocks 96

Both runs use the same engine settings and workload (greedy, ignore_eos), one after the other in
one process; compare the two rows as a ratio.
"""
from __future__ import annotations

import argparse
import time

from tokenmill import LLM, SamplingParams
from tokenmill.workload import WorkloadRecord, load_workload


def run(args, admission: bool, reqs: list[WorkloadRecord]) -> dict:
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, num_kv_blocks=args.kv_blocks,
              enable_admission_control=admission, enable_prefix_caching=False)
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    steps0, preempt0 = engine.num_steps, engine.stats().scheduler.num_preemptions
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"admission_control": admission, "seconds": elapsed, "output_tok_s": n_out / elapsed,
            "preemptions": engine.stats().scheduler.num_preemptions - preempt0, "steps": engine.num_steps - steps0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-blocks", type=int, default=96, help="KV cache size in 16-token blocks")
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args()
    reqs = load_workload(args.workload)
    rows = [run(args, admission, reqs) for admission in (False, True)]
    print(f"{'admission control':>18} {'seconds':>8} {'output tok/s':>13} {'preemptions':>12} {'steps':>6}")
    for r in rows:
        print(f"{'on' if r['admission_control'] else 'off':>18} {r['seconds']:8.1f} {r['output_tok_s']:13.1f} "
              f"{r['preemptions']:12d} {r['steps']:6d}")
    print(f"throughput on/off: {rows[1]['output_tok_s'] / rows[0]['output_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
