"""The cost of structured outputs in a batch: 32 requests, none constrained vs one constrained.

    .venv/bin/python benchmarks/structured_outputs.py [--model M] [--requests 32] [--tokens 64] [--rounds 3]

Every request generates exactly --tokens tokens (greedy, ignore_eos; the constrained one follows a
regex longer than that, so it ends by length too), so both batches do the same model work; the
difference is the grammar's bitmask, the float32 sampling path of its row, and its matcher.
Rounds alternate the two batches in one process; the figure is the ratio of their median times.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from tokenmill import LLM, SamplingParams, StructuredOutputsParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(model=args.model, enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    plain = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    spec = StructuredOutputsParams(regex=f"[a-z ]{{{args.tokens * 8}}}")
    one = [plain.clone(structured_outputs=spec)] + [plain] * (args.requests - 1)
    llm.generate(prompts[:2], [one[0], plain], use_tqdm=False)  # warm-up (and the grammar compiled)
    times = {"none": [], "one": []}
    for _ in range(args.rounds):
        for name, params in (("none", plain), ("one", one)):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times[name].append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
    total = args.requests * args.tokens
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>4} constrained: median {med:.2f} s over {args.rounds} rounds, {total / med:.1f} output tok/s")
    ratio = statistics.median(times["one"]) / statistics.median(times["none"])
    print(f"time ratio one/none: {ratio:.3f}")


if __name__ == "__main__":
    main()
