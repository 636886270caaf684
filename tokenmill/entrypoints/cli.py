"""Command line: `tokenmill generate | serve | bench serve | bench throughput | bench calibrate | bench workload |
trace | simulate ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from dataclasses import fields


def add_engine_args(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                    help: dict[str, str] | None = None) -> None:
    """One flag per EngineConfig field (all of them, or `names`), with the field's name, type, default
    and help: --max-num-seqs for max_num_seqs, --no-X for a knob that is on by default. `help`
    replaces a field's help where this command means something more specific."""
    from tokenmill.config import EngineConfig

    g = p.add_argument_group("engine")
    types = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        kind = next((t for t in typing.get_args(types[f.name]) if t is not type(None)), types[f.name])
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        text = (help or {}).get(f.name, meta["help"])
        if f.default is not None and kind is not bool and "default" not in text:
            text += f" (default: {f.default})"
        kw = dict(dest=f.name, default=f.default, help=text)
        if kind is bool and f.default is None:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is bool:
            kw["action"] = "store_false" if f.default else "store_true"
            if f.default and meta["flag"] is None:
                flag = "--no-" + f.name.replace("_", "-")
        else:
            kw.update(type=kind, choices=meta["choices"], metavar=meta["metavar"])
        g.add_argument(flag, **kw)


def engine_kwargs(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict:
    """The EngineConfig arguments parsed by add_engine_args (the same `names`)."""
    from tokenmill.config import EngineConfig

    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if names is None or f.name in names}


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


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tokenmill.entrypoints.openai.server import ServerOptions, run_server

    options = ServerOptions(api_key=args.api_key or os.environ.get("TOKENMILL_API_KEY"),
                            tool_call_parser=args.tool_call_parser, default_max_tokens=args.default_max_tokens,
                            max_tokens_limit=args.max_tokens_limit)
    run_server(engine_kwargs(args), host=args.host, port=args.port, options=options,
               served_model_name=args.served_model_name, log_level=args.uvicorn_log_level)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.serve import main as bench_serve_main

    return bench_serve_main(args)


def add_serve_parsers(sub) -> None:
    """`tokenmill serve` (the OpenAI-compatible server) and `tokenmill bench serve` (its load client)."""
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $TOKENMILL_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients name (default: --model)")
    serve.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json", "mistral"),
                       help='how tool_choice "auto" (the default with tools) reads tool calls from the output: '
                            "hermes (Qwen2.5 <tool_call>), llama3_json, mistral ([TOOL_CALLS])")
    serve.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                       help="max_tokens of a request that gives none (default: 16 on /v1/completions, up to "
                            "the context on /v1/chat/completions)")
    serve.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                       help="a request asking for more than N tokens gets a 400 (and one asking none gets at most N)")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bs = bench_sub.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server "
                                            "(the figures of vLLM's bench serve)")
    bs.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    bs.add_argument("--workload", required=True, help="JSONL: prompt_token_ids (or prompt) and max_tokens per line")
    bs.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: inf)")
    bs.add_argument("--max-concurrency", type=int, default=None)
    bs.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    bs.add_argument("--model", default=None, help="model id to send (default: the server's first /v1/models)")
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--num-prompts", type=int, default=None, help="use only the first N workload lines")
    bs.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    bs.add_argument("--skip-initial-test", action="store_true", help="don't send one test request first")
    bs.add_argument("--disable-tqdm", action="store_true")
    bs.add_argument("--result-file", default=None, help="also write the figures as JSON")
    bs.set_defaults(func=cmd_bench_serve)


def cmd_trace_show(args: argparse.Namespace) -> int:
    from tokenmill.engine.timeline import format_steps, format_summary
    from tokenmill.engine.trace import read_trace

    records = read_trace(args.path)
    if not records:
        print(f"{args.path}: no steps", file=sys.stderr)
        return 1
    if not args.summary_only:
        print("\n".join(format_steps(records, width=args.width)))
        print()
    print(format_summary(records))
    return 0


def cmd_trace_plot(args: argparse.Namespace) -> int:
    from tokenmill.engine.timeline import arrivals_path, plot_timeline, read_arrivals
    from tokenmill.engine.trace import read_trace

    arrivals = read_arrivals(args.path)
    if arrivals is not None:
        print(f"arrival times from {arrivals_path(args.path)}")
    plot_timeline(read_trace(args.path), args.output, title=args.title, arrivals=arrivals,
                  max_lanes=args.max_lanes)
    print(f"wrote {args.output}")
    return 0


# The EngineConfig knobs the simulator's scheduler reads (the policy comes from --policy).
SIMULATED_KNOBS = ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                   "enable_prefix_caching", "sjf_aging_rate", "preemption_mode", "enable_admission_control",
                   "initial_output_ratio", "output_ratio_decay")


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.core.policy import POLICIES
    from tokenmill.sim.simulator import (DEFAULT_COST_MODEL, CostModel, format_comparison, format_result,
                                         make_arrivals, simulate)
    from tokenmill.workload import load_workload

    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    records = load_workload(args.workload)
    cost = CostModel.load(args.cost_model) if args.cost_model else DEFAULT_COST_MODEL
    arrivals = make_arrivals(records, args.num_requests, args.arrival_rate, args.seed)
    print(f"{len(arrivals)} requests from {args.workload} ({len(records)} records) at {args.arrival_rate} req/s "
          f"(seed {args.seed}) | {args.kv_blocks} KV blocks x {args.block_size} tokens | "
          f"cost model a={cost.a:.4g} s, b={cost.b:.4g} s/token, c={cost.c:.4g} s/context token")
    results = []
    for policy in policies:
        config = EngineConfig(scheduling_policy=policy, num_threads=1, **engine_kwargs(args, SIMULATED_KNOBS))
        trace_path = None
        if args.trace:
            trace_path = args.trace if len(policies) == 1 else args.trace.replace(".jsonl", "") + f".{policy}.jsonl"
        result = simulate(arrivals, config, args.kv_blocks, cost, num_host_blocks=args.swap_blocks,
                          trace_path=trace_path)
        results.append(result)
        print()
        print(format_result(result))
        # NOTE: wall times go to stderr: stdout is the same for the same seed, byte for byte.
        print(f"[{policy}: {result.wall_time:.2f} s wall, {result.schedule_time:.2f} s of it in Scheduler.schedule()]",
              file=sys.stderr)
    if len(results) > 1:
        print()
        print(format_comparison(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.summary() for r in results], f, indent=1)
    return 0


def cmd_bench_calibrate(args: argparse.Namespace) -> int:
    from tokenmill.sim.calibrate import fit_cost_model, run_calibration

    records = run_calibration(engine_kwargs(args), seed=args.seed)
    cost, info = fit_cost_model(records)
    print(f"fitted on {info['steps']} steps (mean {info['mean_step_s'] * 1e3:.1f} ms): "
          f"a={cost.a:.6g} s, b={cost.b:.6g} s/token, c={cost.c:.6g} s/context token | "
          f"R^2 {info['r2']:.3f}, RMSE {info['rmse_s'] * 1e3:.1f} ms, median error {info['median_rel_err']:.1%}")
    if min(cost.a, cost.b, cost.c) < 0:
        print("warning: a negative coefficient: the steps do not follow a + b*tokens + c*context well "
              "(a busy machine?)", file=sys.stderr)
    if args.out:
        cost.save(args.out)
        print(f"wrote {args.out}")
    return 0


def _subcommand_group(sub, name: str, help: str):
    """The sub-subcommands of `tokenmill NAME` (e.g. bench), made here unless another part made them."""
    parser = sub.choices.get(name)
    if parser is None:
        return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_trace_sim_parsers(sub) -> None:
    """`tokenmill trace show|plot`, `tokenmill simulate` and `tokenmill bench calibrate`."""
    trace = sub.add_parser("trace", help="read a step trace (written with --trace PATH)")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_sub.add_parser("show", help="print each step's batch as a bar, and a summary")
    show.add_argument("path")
    show.add_argument("--width", type=int, default=40, help="longest bar, in characters (bars scale down to fit)")
    show.add_argument("--summary-only", action="store_true")
    show.set_defaults(func=cmd_trace_show)
    plot = trace_sub.add_parser("plot", help="draw a timeline PNG: batch size over time, one lane per request")
    plot.add_argument("path")
    plot.add_argument("-o", "--output", default="timeline.png")
    plot.add_argument("--title", default=None)
    plot.add_argument("--max-lanes", type=int, default=200, help="draw every k-th request past this many")
    plot.set_defaults(func=cmd_trace_plot)

    sim = sub.add_parser("simulate", help="replay a workload through the real scheduler with a step-time cost model")
    sim.add_argument("--workload", required=True,
                     help="JSONL: prompt_token_ids, max_tokens and optional priority (int), tenant (str) per line")
    sim.add_argument("--policy", default="fcfs",
                     help="a scheduling policy, several separated by commas, or 'all' (compared side by side)")
    sim.add_argument("--arrival-rate", type=float, required=True, help="requests/s, Poisson ('inf': all at t=0)")
    sim.add_argument("--num-requests", type=int, default=None,
                     help="default: one per workload line; more replays the workload in seeded shuffles")
    sim.add_argument("--seed", type=int, default=0, help="seeds the arrival times and the replay order")
    sim.add_argument("--kv-blocks", type=int, default=4096, help="KV cache size in blocks (default 4096)")
    add_engine_args(sim, SIMULATED_KNOBS, help={"max_model_len": "default: the longest workload request"})
    sim.add_argument("--swap-blocks", type=int, default=0, help="host blocks for --preemption-mode swap")
    sim.add_argument("--cost-model", default=None,
                     help="JSON {a, b, c} from `tokenmill bench calibrate` (default: built in, fitted on this machine)")
    sim.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    sim.add_argument("--trace", default=None, metavar="PATH",
                     help="write the step trace (virtual seconds) for `tokenmill trace`; "
                          "PATH.<policy>.jsonl when several policies run")
    sim.set_defaults(func=cmd_simulate)

    bench_sub = _subcommand_group(sub, "bench", "benchmarks")
    cal = bench_sub.add_parser("calibrate", help="fit the simulator's cost model to this machine's engine step times")
    cal.add_argument("--out", default=None, help="write the cost model JSON here (e.g. cost_model.json)")
    add_engine_args(cal)
    cal.set_defaults(func=cmd_bench_calibrate)


def cmd_bench_workload(args: argparse.Namespace) -> int:
    from tokenmill.workload import make_workload, write_workload

    requests = make_workload(args.n, args.vocab_size, args.prompt, args.output, args.seed, args.shared_prefix)
    write_workload(args.out, requests)
    print(f"{len(requests)} requests, {sum(len(r['prompt_token_ids']) for r in requests)} prompt tokens, "
          f"{sum(r['max_tokens'] for r in requests)} output tokens -> {args.out}")
    return 0


def _token_range(text: str) -> tuple[int, int]:
    """'LO:HI' -> (LO, HI)."""
    try:
        lo, hi = map(int, text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (two integers), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi


def add_bench_workload_parser(sub) -> None:
    """`tokenmill bench workload`: write a random token-id workload file (the benchmarks' input)."""
    bench_sub = _subcommand_group(sub, "bench", "benchmarks")
    wl = bench_sub.add_parser("workload", help="write a workload file of random token-id requests "
                                               "(the same file as the team's bench/workload.py for the same arguments)")
    wl.add_argument("--out", required=True, help="the JSONL file to write")
    wl.add_argument("--n", type=int, default=128, help="requests (default: 128)")
    wl.add_argument("--prompt", type=_token_range, default=(32, 256), metavar="LO:HI",
                    help="prompt tokens of each request, uniform in [LO, HI], after the shared prefix (default: 32:256)")
    wl.add_argument("--output", type=_token_range, default=(32, 256), metavar="LO:HI",
                    help="max_tokens of each request, uniform in [LO, HI] (default: 32:256)")
    wl.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (default: 0)")
    wl.add_argument("--seed", type=int, default=0, help="(default: 0)")
    wl.add_argument("--vocab-size", type=int, default=49152, help="token ids are drawn from [100, VOCAB_SIZE - 100) "
                                                                  "(default: 49152, SmolLM2's)")
    wl.set_defaults(func=cmd_bench_workload)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.throughput import main as bench_throughput_main

    return bench_throughput_main(args, engine_kwargs(args))


def add_bench_throughput_parser(sub) -> None:
    """`tokenmill bench throughput`: offline throughput with vLLM's `bench throughput` definitions."""
    bench_sub = _subcommand_group(sub, "bench", "benchmarks")
    tp = bench_sub.add_parser("throughput", help="offline throughput on a workload file "
                                                 "(the figures of vLLM's bench throughput)")
    tp.add_argument("--workload", required=True, help="JSONL: prompt_token_ids and max_tokens per line")
    tp.add_argument("--num-prompts", type=int, default=None, help="use only the first N workload lines")
    tp.add_argument("--output-json", default=None, metavar="PATH", help="also write the figures as JSON")
    tp.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.profile import main as bench_profile_main

    return bench_profile_main(args, engine_kwargs(args))


def add_bench_profile_parser(sub) -> None:
    """`tokenmill bench profile`: where a steady decode step's time goes, part by part."""
    bench_sub = _subcommand_group(sub, "bench", "benchmarks")
    pf = bench_sub.add_parser("profile", help="time each part of a steady decode step (attention, GEMMs, "
                                              "kernels, sampler, Python) at the batch sizes asked")
    pf.add_argument("--workload", required=True, help="JSONL: prompt_token_ids per line (max_tokens is not used)")
    pf.add_argument("--batch-sizes", default="64,128", help="comma-separated decode batch sizes (default 64,128)")
    pf.add_argument("--steps", type=int, default=8, help="decode steps timed per batch size, plain and instrumented")
    pf.add_argument("--skip-bandwidth", action="store_true", help="don't measure the machine's memory bandwidth")
    pf.add_argument("--output-json", default=None, metavar="PATH", help="also write the figures as JSON")
    add_engine_args(pf)
    pf.set_defaults(func=cmd_bench_profile)


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
    add_serve_parsers(sub)
    add_trace_sim_parsers(sub)
    add_bench_throughput_parser(sub)
    add_bench_profile_parser(sub)
    add_bench_workload_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the real command line (not a call from Python): run on tcmalloc where installed
        from tokenmill.entrypoints.allocator import reexec_with_tcmalloc
        reexec_with_tcmalloc()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
