"""Accuracy of the int8 KV cache against the model's own dtype, on the same prompts.

    python benchmarks/kv_cache_accuracy.py [--workload F] [--num-requests 32] [--max-tokens 128] [--dtype bfloat16]

Two engines, one with `kv_cache_dtype="auto"` (the reference: the cache in the model's dtype) and
one with `kv_cache_dtype="int8"`, run the same greedy requests (the workload's prompts; without
--workload, `tokenmill.workload.make_workload`'s defaults, seed 0). Printed:

* free-running greedy agreement: the share of requests whose whole output is the same token for
  token, and the share of output tokens before each request's first differing token;
* teacher-forced, over the reference's outputs (the int8 engine scores the reference's prompt +
  output with prompt_logprobs, so every position sees the same context): the share of positions
  where the int8 engine's top token is the reference's token, and |logprob difference| of the
  reference's token (mean, 99th percentile, max).
"""
from __future__ import annotations

import argparse
import statistics

from tokenmill import LLM, SamplingParams
from tokenmill.workload import load_workload, make_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", help="workload file (default: make_workload's requests, seed 0)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.workload:
        prompts = [r.prompt_token_ids for r in load_workload(args.workload, args.num_requests)]
    else:
        prompts = [r["prompt_token_ids"] for r in make_workload(args.num_requests)]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)

    outputs, engines = {}, {}
    for cache in ("auto", "int8"):
        engines[cache] = llm = LLM(model=args.model, dtype=args.dtype, kv_cache_dtype=cache)
        outputs[cache] = [o.outputs[0].token_ids for o in llm.generate(inputs, greedy, use_tqdm=False)]
    ref, q8 = outputs["auto"], outputs["int8"]
    same = sum(a == b for a, b in zip(ref, q8))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, q8))
    total = sum(len(a) for a in ref)

    # Teacher-forced: both engines score prompt + reference output.
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    forced = [{"prompt_token_ids": p + list(o)} for p, o in zip(prompts, ref)]
    scored = {cache: engines[cache].generate(forced, score, use_tqdm=False) for cache in engines}
    diffs, top_same, positions = [], 0, 0
    for i, (p, o) in enumerate(zip(prompts, ref)):
        lp_ref, lp_q8 = scored["auto"][i].prompt_logprobs, scored["int8"][i].prompt_logprobs
        for j, tok in enumerate(o):
            pos = len(p) + j
            r, q = lp_ref[pos], lp_q8[pos]
            diffs.append(abs(r[tok] - q[tok]))
            top_same += max(q, key=q.get) == tok
            positions += 1
    diffs.sort()
    print(f"{args.dtype} model, {len(prompts)} requests x {args.max_tokens} greedy tokens; int8 KV cache vs "
          f"the {args.dtype} cache")
    print(f"  free-running: identical outputs {same}/{len(prompts)} ({same / len(prompts):.1%}), "
          f"tokens before the first difference {prefix}/{total} ({prefix / total:.1%})")
    print(f"  teacher-forced over {positions} output positions: top-1 agreement {top_same / positions:.2%}, "
          f"|logprob diff| of the reference token mean {statistics.fmean(diffs):.4f}, "
          f"p99 {diffs[int(0.99 * (len(diffs) - 1))]:.4f}, max {diffs[-1]:.4f}")


if __name__ == "__main__":
    main()
