"""`tokenmill bench serve`: online serving benchmark against any OpenAI-compatible server.

Mirrors vLLM's `vllm bench serve` so the two can be read side by side on the same workload file:
requests are sent to /v1/completions as token-id prompts (temperature 0, ignore_eos, streamed,
usage included), arriving as a Poisson process at --request-rate (gamma inter-arrival times when
--burstiness != 1), at most --max-concurrency in flight. Per request, as vLLM measures them:

  TTFT   first streamed chunk with choices - send time
  ITL    time between consecutive such chunks (each gap is one sample)
  E2EL   last chunk - send time
  TPOT   (E2EL - TTFT) / (output tokens - 1), over requests with more than one output token

Throughputs divide by the benchmark's wall time (first send to last finish); output tokens are
the server's usage.completion_tokens.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tokenmill.workload import load_workload


@dataclass
class WorkloadRequest:
    prompt: list[int] | str
    prompt_len: int
    max_tokens: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def load_requests(path: str, num_prompts: int | None = None) -> list[WorkloadRequest]:
    """The workload's requests as sent: token ids, or text where a line gives `prompt` instead."""
    return [WorkloadRequest(r.prompt_token_ids if r.prompt is None else r.prompt, r.prompt_len, r.max_tokens)
            for r in load_workload(path, num_prompts, allow_text=True)]


async def send_request(client, url: str, model: str, req: WorkloadRequest, headers: dict) -> RequestResult:
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(prompt_len=req.prompt_len)
    start = most_recent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - most_recent)
                    most_recent = now
                elif chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    result.prompt_len = result.prompt_len or chunk["usage"].get("prompt_tokens") or 0
        result.latency = most_recent - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "the stream held no choices"
        if not result.output_tokens:  # a server without usage: one token per chunk
            result.output_tokens = len(result.itl) + 1
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


def _arrival_gaps(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps after each request (vLLM: gamma(shape=burstiness, scale=1/(rate*burstiness)))."""
    if request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


async def run_benchmark(base_url: str, requests: list[WorkloadRequest], request_rate: float,
                        max_concurrency: int | None = None, model: str | None = None,
                        api_key: str | None = None, burstiness: float = 1.0, seed: int = 0,
                        initial_test: bool = True, progress: bool = True) -> dict:
    import httpx
    from tqdm import tqdm

    base_url = base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) + 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(6 * 3600), limits=limits) as client:
        if model is None:
            r = await client.get(f"{base_url}/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        url = f"{base_url}/completions"
        if initial_test:
            test = await send_request(client, url, model, requests[0], headers)
            if not test.success:
                raise RuntimeError(f"initial test request failed: {test.error}")

        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), disable=not progress, file=sys.stderr, desc="requests")

        async def limited(req: WorkloadRequest) -> RequestResult:
            if semaphore is None:
                result = await send_request(client, url, model, req, headers)
            else:
                async with semaphore:
                    result = await send_request(client, url, model, req, headers)
            bar.update(1)
            return result

        gaps = _arrival_gaps(len(requests), request_rate, burstiness, seed)
        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            tasks.append(asyncio.create_task(limited(req)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return compute_metrics(results, duration, model=model, request_rate=request_rate,
                           max_concurrency=max_concurrency, burstiness=burstiness)


def compute_metrics(results: list[RequestResult], duration: float, **info) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    m = dict(info, completed=len(ok), failed=len(results) - len(ok), duration=duration,
             total_input_tokens=total_input, total_output_tokens=total_output,
             request_throughput=len(ok) / duration, output_throughput=total_output / duration,
             total_token_throughput=(total_input + total_output) / duration,
             errors=sorted({r.error for r in results if r.error})[:5])
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        values_ms = np.asarray(values or [0.0]) * 1000
        m[f"mean_{name}_ms"] = float(values_ms.mean())
        m[f"median_{name}_ms"] = float(np.median(values_ms))
        m[f"std_{name}_ms"] = float(values_ms.std())
        m[f"p99_{name}_ms"] = float(np.percentile(values_ms, 99))
    return m


def format_report(m: dict) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label, value, fmt="{:<10}"):
        lines.append(("{:<40} " + fmt).format(label, value))

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if m.get("max_concurrency"):
        row("Maximum request concurrency:", m["max_concurrency"])
    row("Request rate configured (RPS):", m["request_rate"], "{:<10.2f}")
    row("Benchmark duration (s):", m["duration"], "{:<10.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], "{:<10.2f}")
    row("Output token throughput (tok/s):", m["output_throughput"], "{:<10.2f}")
    row("Total Token throughput (tok/s):", m["total_token_throughput"], "{:<10.2f}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        label = name.upper()
        row(f"Mean {label} (ms):", m[f"mean_{name}_ms"], "{:<10.2f}")
        row(f"Median {label} (ms):", m[f"median_{name}_ms"], "{:<10.2f}")
        row(f"P99 {label} (ms):", m[f"p99_{name}_ms"], "{:<10.2f}")
    lines.append("=" * 50)
    if m.get("errors"):
        lines.append("errors: " + "; ".join(m["errors"]))
    return "\n".join(lines)


def main(args) -> int:
    requests = load_requests(args.workload, args.num_prompts)
    metrics = asyncio.run(run_benchmark(
        args.base_url, requests, args.request_rate, args.max_concurrency, model=args.model,
        api_key=args.api_key, burstiness=args.burstiness, seed=args.seed,
        initial_test=not args.skip_initial_test, progress=not args.disable_tqdm))
    print(format_report(metrics))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(dict(metrics, base_url=args.base_url, workload=args.workload), f, indent=2)
    return 0 if metrics["completed"] else 1

