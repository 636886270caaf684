"""`tokenmill bench throughput`: offline throughput, with the definitions of vLLM's `bench throughput`.

Every workload request (`prompt_token_ids`, `max_tokens`) runs greedy with ignore_eos, so it
generates exactly max_tokens. After a warm-up that is not counted (one 1-token request, whose end
is the first generated token, then a couple of small requests), one `LLM.generate` over all the
requests is timed:

  elapsed_time              wall time of that one generate call
  requests_per_second       num_requests / elapsed_time
  tokens_per_second         (prompt tokens + output tokens) / elapsed_time   (vLLM's "total tokens/s")
  output_tokens_per_second  output tokens / elapsed_time

Start-up, measured from the process start (the kernel's start time of this process, read from
/proc/self/stat, so interpreter start-up and imports count):

  startup_seconds                          the LLM(...) construction alone
  time_to_first_token_from_start_seconds   process start -> the first generated token (warm-up)
"""
from __future__ import annotations

import json
import os
import sys
import time

from tokenmill.workload import load_workload

# Fallback when /proc is not there: as early as this module can see (the CLI imports it lazily).
_IMPORT_TIME = time.time()


def process_start_time() -> tuple[float, str]:
    """(Unix time this process started, where that came from)."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK"), "/proc/self/stat"
    except (OSError, ValueError, StopIteration, IndexError):
        return _IMPORT_TIME, "module import"


def load_requests(path: str, num_prompts: int | None = None) -> list[dict]:
    """Workload records (tokenmill/workload.py) as {"prompt_token_ids": [...], "max_tokens": k}."""
    return [{"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens}
            for r in load_workload(path, num_prompts)]


def warmup_prompts(n: int = 2, length: int = 16) -> list[list[int]]:
    """Small prompts that share no full block with a workload (so the prefix cache gains nothing)."""
    return [[1000 + 7 * i + j for j in range(length)] for i in range(n)]


def throughput_metrics(elapsed: float, prompt_lens: list[int], output_lens: list[int]) -> dict:
    prompt_tokens, output_tokens = sum(prompt_lens), sum(output_lens)
    total = prompt_tokens + output_tokens
    return {"elapsed_time": elapsed, "num_requests": len(prompt_lens), "total_num_tokens": total,
            "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "requests_per_second": len(prompt_lens) / elapsed, "tokens_per_second": total / elapsed,
            "output_tokens_per_second": output_tokens / elapsed}


def format_report(m: dict) -> str:
    lines = [f"Throughput: {m['requests_per_second']:.2f} requests/s, {m['tokens_per_second']:.2f} total tokens/s, "
             f"{m['output_tokens_per_second']:.2f} output tokens/s",
             f"Total num prompt tokens:  {m['total_prompt_tokens']}",
             f"Total num output tokens:  {m['total_output_tokens']}",
             f"Elapsed time: {m['elapsed_time']:.2f} s for {m['num_requests']} requests"]
    if m.get("startup_seconds") is not None:
        lines.append(f"Engine start-up: {m['startup_seconds']:.2f} s ({m.get('startup_what', 'LLM construction')}), "
                     f"{m['time_to_first_token_from_start_seconds']:.2f} s from process start to the first "
                     f"generated token (process start from {m.get('process_start_source', '?')})")
    return "\n".join(lines)


def main(args, engine_kwargs: dict) -> int:
    t_proc, source = process_start_time()
    requests = load_requests(args.workload, args.num_prompts)

    from tokenmill import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    startup = time.perf_counter() - t0

    # Warm-up, not counted: one token first (its end is the first generated token), then two small requests.
    warm = warmup_prompts()
    llm.generate([{"prompt_token_ids": warm[0]}], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                 use_tqdm=False)
    ttft_from_start = time.time() - t_proc
    llm.generate([{"prompt_token_ids": p} for p in warm],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - t1

    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    expected = [r["max_tokens"] for r in requests]
    if output_lens != expected:
        short = sum(1 for got, want in zip(output_lens, expected) if got != want)
        print(f"warning: {short} requests generated other than max_tokens tokens "
              "(max_model_len cut them?); counting the tokens generated", file=sys.stderr)

    config = llm.llm_engine.config
    m = throughput_metrics(elapsed, prompt_lens, output_lens)
    m.update(startup_seconds=startup, time_to_first_token_from_start_seconds=ttft_from_start,
             process_start_source=source, engine="tokenmill", workload=args.workload,
             engine_args=dict(engine_kwargs),
             engine_settings={"dtype": str(config.torch_dtype).removeprefix("torch."),
                              **{k: v for k, v in vars(config).items() if not k.startswith("_")
                                 and isinstance(v, (int, float, str, bool, type(None)))}})
    print(format_report(m))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(m, f, indent=2)
    llm.llm_engine.close()
    return 0
