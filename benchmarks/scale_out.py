"""Serving through vllm-router: one instance, two data-parallel replicas, a prefill/decode pair.

    .venv/bin/python benchmarks/scale_out.py [--model M] [--setups one,replicas,pd] [--workloads serve,long]
        [--serve-rate 2] [--long-rate 0.2] [--out-dir scale_out]

Each setup runs `tokenmill serve` processes and `vllm-router` in front of them, then
`tokenmill bench serve` against the router, for each workload:

- serve: wl_serve (64 requests, 128 in / 128 out, seed 2) at --serve-rate requests/s;
- long: 64 requests, 1,024-2,048 in / 64-128 out (seed 1) at --long-rate requests/s.

The machine's CPUs are split between the workers: one instance gets all of them; each replica, and
each of the prefill and decode instances, gets its share (taskset and --num-threads), so every setup
spends the same cores. Prints TTFT, TPOT and ITL (mean and P99) per setup and workload, and where the
requests went (completions per worker from its /metrics). Run it alone: anything else on the cores
moves the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
WORKLOADS = {"serve": ["--n", "64", "--prompt", "128:128", "--output", "128:128", "--seed", "2"],
             "long": ["--n", "64", "--prompt", "1024:2048", "--output", "64:128", "--seed", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


class Setup:
    """Worker processes pinned to their CPUs, and vllm-router in front of them."""

    def __init__(self, name: str, model: str | None, out_dir: Path) -> None:
        self.name, self.out_dir, self.procs = name, out_dir, []
        cpus = sorted(os.sched_getaffinity(0))
        model_args = ["--model", model] if model else []
        if name == "one":
            groups, roles = [cpus], [[]]
        elif name in ("replicas", "pd"):
            half = max(1, len(cpus) // 2)
            groups = [cpus[:half], cpus[half:] or cpus[:half]]
            roles = ([[], []] if name == "replicas" else
                     [["--kv-role", "producer", "--kv-port", str(free_port())], ["--kv-role", "consumer"]])
        else:
            raise SystemExit(f"unknown setup {name!r}: one, replicas or pd")
        self.workers = []
        for i, (group, role) in enumerate(zip(groups, roles)):
            port = free_port()
            cmd = ["taskset", "-c", ",".join(map(str, group)), str(VENV_BIN / "tokenmill"), "serve", *model_args,
                   "--port", str(port), "--num-threads", str(len(group)), *role]
            self.workers.append((f"http://127.0.0.1:{port}", self._start(cmd, f"{name}-worker{i}.log")))
        for url, (proc, log) in self.workers:
            wait_http(f"{url}/health", proc, log)
        router_args = (["--worker-urls", *(url for url, _ in self.workers), "--policy", "round_robin"]
                       if name != "pd" else
                       ["--vllm-pd-disaggregation", "--prefill", self.workers[0][0], "--decode", self.workers[1][0],
                        "--policy", "round_robin"])
        self.router_port = free_port()
        cmd = [str(VENV_BIN / "vllm-router"), "--host", "127.0.0.1", "--port", str(self.router_port),
               "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1", *router_args]
        proc, log = self._start(cmd, f"{name}-router.log")
        wait_http(f"{self.url}/v1/models", proc, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def _start(self, cmd: list[str], log_name: str) -> tuple[subprocess.Popen, Path]:
        log = self.out_dir / log_name
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc, log

    def completions_per_worker(self) -> list[int]:
        counts = []
        for url, _ in self.workers:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            counts.append(int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                  if line.startswith("tokenmill:request_success_total{"))))
        return counts

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: tokenmill's default model")
    ap.add_argument("--setups", default="one,replicas,pd")
    ap.add_argument("--workloads", default="serve,long")
    ap.add_argument("--serve-rate", type=float, default=2.0)
    ap.add_argument("--long-rate", type=float, default=0.2)
    ap.add_argument("--out-dir", default="scale_out")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = {"serve": args.serve_rate, "long": args.long_rate}
    for wl in args.workloads.split(","):
        subprocess.run([str(VENV_BIN / "tokenmill"), "bench", "workload", *WORKLOADS[wl],
                        "--out", str(out_dir / f"wl_{wl}.jsonl")], check=True, stdout=subprocess.DEVNULL)
    rows = []
    for name in args.setups.split(","):
        setup = Setup(name, args.model, out_dir)
        try:
            for wl in args.workloads.split(","):
                before = setup.completions_per_worker()
                result = out_dir / f"{name}-{wl}.json"
                subprocess.run([str(VENV_BIN / "tokenmill"), "bench", "serve", "--base-url", setup.url,
                                "--workload", str(out_dir / f"wl_{wl}.jsonl"), "--request-rate", str(rates[wl]),
                                "--disable-tqdm", "--result-file", str(result)], check=True,
                               stdout=open(out_dir / f"{name}-{wl}.txt", "w"))
                m = json.loads(result.read_text())
                spread = [a - b for a, b in zip(setup.completions_per_worker(), before)]
                rows.append((name, wl, rates[wl], m, spread))
                print(f"{name:>8} {wl:>5}: TTFT P99 {m['p99_ttft_ms']:.0f} ms, TPOT P99 {m['p99_tpot_ms']:.1f} ms, "
                      f"ITL P99 {m['p99_itl_ms']:.1f} ms ({m['completed']} done, {m['failed']} failed)", flush=True)
        finally:
            setup.close()
    print("\n| setup | workload | req/s | TTFT mean / P99 (ms) | TPOT mean / P99 (ms) | ITL mean / P99 (ms) "
          "| output tok/s | completions per worker |")
    print("|---|---|---|---|---|---|---|---|")
    for name, wl, rate, m, spread in rows:
        print(f"| {name} | {wl} | {rate:g} | {m['mean_ttft_ms']:.0f} / {m['p99_ttft_ms']:.0f} "
              f"| {m['mean_tpot_ms']:.1f} / {m['p99_tpot_ms']:.1f} | {m['mean_itl_ms']:.1f} / {m['p99_itl_ms']:.1f} "
              f"| {m['output_throughput']:.1f} | {' + '.join(map(str, spread))} |")


if __name__ == "__main__":
    main()
