"""Hugging Face transformers on a workload file, for benchmarks/compare.py (one process per run).

    .venv/bin/python benchmarks/_hf_runner.py --model FOLDER --workload FILE [--single N] [--batched M]
        [--batch-size 16] [--dtype float32] [--num-threads N] [--output-json PATH]

One model load, then (each timed on its own):
--single N:  the first N requests one at a time, model.generate(greedy, min_new_tokens = max_new_tokens
             = max_tokens).
--batched M: the first M requests in static batches of --batch-size in workload order, left padded; a
             batch runs until its longest max_tokens, so shorter requests generate tokens nobody asked
             for. Each request is counted with its own max_tokens as output (the extra tokens are
             wasted work, not output).
--output-json gets a list: one result per mode run.

Figures as `tokenmill bench throughput` (elapsed_time, requests_per_second, tokens_per_second,
output_tokens_per_second, startup_seconds = model load, time_to_first_token_from_start_seconds).
"""
from __future__ import annotations

import argparse
import json
import time

from tokenmill.benchmarks.throughput import (format_report, load_requests, process_start_time,
                                             throughput_metrics, warmup_prompts)


def main() -> int:
    t_proc, source = process_start_time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder")
    p.add_argument("--workload", required=True)
    p.add_argument("--single", type=int, default=0, help="requests to run one at a time (0: none)")
    p.add_argument("--batched", type=int, default=0, help="requests to run in static batches (0: none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    requests = load_requests(args.workload)

    import torch
    from transformers import AutoModelForCausalLM

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    startup = time.perf_counter() - t0
    gen_cfg = model.generation_config
    pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0
    if isinstance(gen_cfg.eos_token_id, list):
        pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id[0]

    def generate(batch: list[list[int]], new_tokens: int) -> torch.Tensor:
        """Greedy, exactly new_tokens per sequence (EOS suppressed until then), left padded."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                                 temperature=None, top_p=None, top_k=None)
        return out[:, width:]

    warm = warmup_prompts()
    generate(warm[:1], 1)
    ttft_from_start = time.time() - t_proc
    generate(warm, 8)

    results = []
    for mode, count in (("single", args.single), ("batched", args.batched)):
        if count <= 0:
            continue
        prompts = [r["prompt_token_ids"] for r in requests[:count]]
        max_tokens = [r["max_tokens"] for r in requests[:count]]
        generated = 0  # tokens actually computed, wasted ones included
        t1 = time.perf_counter()
        if mode == "single":
            for ids, mt in zip(prompts, max_tokens):
                got = generate([ids], mt).shape[1]
                if got != mt:
                    raise RuntimeError(f"transformers generated {got} tokens for max_tokens={mt}")
                generated += got
        else:
            for start in range(0, len(prompts), args.batch_size):
                out = generate(prompts[start:start + args.batch_size], max(max_tokens[start:start + args.batch_size]))
                generated += out.numel()
        elapsed = time.perf_counter() - t1

        m = throughput_metrics(elapsed, [len(ids) for ids in prompts], max_tokens)
        m.update(startup_seconds=startup, startup_what="model load",
                 time_to_first_token_from_start_seconds=ttft_from_start, process_start_source=source,
                 engine=f"transformers-{mode}", mode=mode, workload=args.workload,
                 tokens_generated_incl_padding=generated,
                 engine_settings={"dtype": args.dtype, "num_threads": torch.get_num_threads(),
                                  "batch_size": args.batch_size if mode == "batched" else 1})
        how = "one request at a time" if mode == "single" else f"static batches of {args.batch_size}"
        print(f"--- transformers, {how}, {count} requests")
        print(format_report(m))
        if mode == "batched":
            print(f"({generated} tokens computed for {m['total_output_tokens']} requested)")
        results.append(m)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
