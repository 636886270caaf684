"""Command line: `tokenmill generate ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time



def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache size in bytes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-steps", action="store_true", help="print one line per engine step to stderr")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("model", "dtype", "max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
             "enable_chunked_prefill", "kv_cache_memory", "seed", "log_steps")
    return {n: getattr(args, n) for n in names}


def _read_prompts(args, tokenizer) -> tuple[list, list[int | None]]:
    """Prompts from the command line and/or a file: text lines, or JSONL workload records."""
    prompts: list = list(args.prompts)
    max_tokens: list[int | None] = [None] * len(prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    rec = json.loads(line)
                    prompts.append({"prompt_token_ids": rec["prompt_token_ids"]} if "prompt_token_ids" in rec
                                   else rec["prompt"])
                    max_tokens.append(rec.get("max_tokens"))
                else:
                    prompts.append(line)
                    max_tokens.append(None)
    if args.chat:
        prompts = [_chat_prompt(tokenizer, p) if isinstance(p, str) else p for p in prompts]
    return prompts, max_tokens


def _chat_prompt(tokenizer, text: str) -> dict:
    """The user message wrapped in the chat template, as token ids (the template holds the special tokens)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(rendered, add_special_tokens=False)}


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    load_s = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    prompts, file_max_tokens = _read_prompts(args, tokenizer)
    if not prompts:
        print("error: no prompts given (pass them as arguments or with --prompts-file)", file=sys.stderr)
        return 2
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed,
                             max_tokens=mt or args.max_tokens, ignore_eos=args.ignore_eos) for mt in file_max_tokens]
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    gen_s = time.perf_counter() - t1

    if not args.quiet:
        for i, out in enumerate(outputs):
            shown = out.prompt if out.prompt is not None else f"<{len(out.prompt_token_ids)} prompt tokens>"
            print(f"--- [{i}] prompt: {shown!r}")
            print(out.outputs[0].text.strip())
            print(f"    ({len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason})")
    n_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"\n{len(outputs)} requests | {n_prompt} prompt tokens | {n_out} output tokens | "
          f"load {load_s:.1f} s | generate {gen_s:.2f} s | {n_out / gen_s:.1f} output tok/s | "
          f"{(n_prompt + n_out) / gen_s:.1f} total tok/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts, offline")
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument("--prompts-file", help="one prompt per line, or JSONL with prompt / prompt_token_ids / max_tokens")
    gen.add_argument("--chat", action="store_true", help="wrap each text prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="print only the summary line")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
