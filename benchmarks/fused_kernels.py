"""Micro-benchmark (not named kernels.py: transformers probes for a `kernels` package, and vLLM's runner
imports transformers with this folder on sys.path): each fused kernel of tokenmill's CPU extension at decode-step shapes, bf16 and fp32.

    python benchmarks/fused_kernels.py [--rows 64,128] [--threads N] [--seconds S]

SmolLM2-135M's shapes: hidden 576, intermediate 1536 (gate_up 3072 wide), 9 + 3 rotated heads of
64, vocabulary 49,152 (argmax). Per call, best of several rounds, and the bytes it moves per second
(read + written): every one of these is a single pass over memory, so GB/s says how close to the
machine's bandwidth it runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from tokenmill.models.layers.cpu_ops import load_extension

HIDDEN, INTER, QK_HEADS, HEAD_DIM, VOCAB = 576, 1536, 12, 64, 49152


def best_time(fn, seconds: float, rounds: int = 7) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds / rounds:
        fn()
        n += 1
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def cases(ops, rows: int, dtype: torch.dtype):
    """(name, fn, bytes moved) of each kernel at `rows` rows."""
    e = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(rows, HIDDEN).to(dtype)
    res = torch.randn(rows, HIDDEN).to(dtype)
    w = torch.randn(HIDDEN).to(dtype)
    gate_up = torch.randn(rows, 2 * INTER).to(dtype)
    qk = torch.randn(rows, QK_HEADS, HEAD_DIM).to(dtype)
    pos = torch.randint(0, 2048, (rows,))
    cos, sin = torch.randn(2048, HEAD_DIM), torch.randn(2048, HEAD_DIM)
    logits = torch.randn(rows, VOCAB).to(dtype)
    out = [("rms_norm", lambda: ops.rms_norm(x, w, 1e-5), 2 * x.numel() * e),
           ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, res, w, 1e-5), 4 * x.numel() * e),
           ("silu_and_mul", lambda: ops.silu_and_mul(gate_up), 1.5 * gate_up.numel() * e),
           ("rotary_embedding", lambda: ops.rotary_embedding(qk, pos, cos, sin), 2 * qk.numel() * e)]
    if hasattr(ops, "argmax"):
        out.append(("argmax", lambda: ops.argmax(logits), logits.numel() * e))
    out.append(("torch.argmax", lambda: logits.argmax(-1), logits.numel() * e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,128", help="comma-separated row counts (decode batch sizes)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=0.3, help="time per case")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = load_extension()
    lanes = ops.vector_lanes() if hasattr(ops, "vector_lanes") else "?"
    print(f"{torch.get_num_threads()} threads, {lanes} float32 lanes per vector; us per call (GB/s)")
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{'kernel':<20} {'dtype':<9}" + "".join(f" {f'{r} rows':>18}" for r in rows))
    for dtype in (torch.bfloat16, torch.float32):
        table: dict[str, list[str]] = {}
        for r in rows:
            for name, fn, nbytes in cases(ops, r, dtype):
                t = best_time(fn, args.seconds)
                table.setdefault(name, []).append(f"{t * 1e6:9.1f} ({nbytes / t / 1e9:5.1f})")
        for name, cells in table.items():
            print(f"{name:<20} {str(dtype).removeprefix('torch.'):<9}" + "".join(f" {c:>18}" for c in cells))


if __name__ == "__main__":
    main()
