"""Micro-benchmark: per-call time of the attention backends on the default model's shapes.

    python benchmarks/attention.py [--dtype float32|bfloat16] [--threads N] [--seconds S]

SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64, block size 16. Each call is one layer's
attention of one step (writing the step's new K/V into the cache, then attending); calls rotate
over several layer caches, as in the model, so the cache is not warm from the previous call. The
per-step prepare() (shared by all layers) is timed separately. Cases: decode batches of 8/32/64
requests with contexts of 100-500 tokens, a prefill of 4 chunks of 256 tokens, and a mixed step
(decodes plus a fresh and a continuing prompt chunk), as the scheduler builds them, and decode
batches whose requests share a cached 512-token prompt prefix (the same first blocks), with the
cpu backend's shared-prefix pass on and off.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from tokenmill.models.layers.attention import AttentionInputs, TorchPagedAttention, kv_cache_shape
from tokenmill.models.layers.cpu_attention import CpuPagedAttention

H, KVH, D, BLOCK = 9, 3, 64, 16


def make_step(specs, dtype, num_layers, seed=0, shared_prefix=0):
    """specs: (cached tokens, new tokens) per request -> q, k, v, per-layer caches, inputs. Every
    request's first shared_prefix // BLOCK blocks are the first request's (a cached prompt prefix)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-(ctx + n) // BLOCK) for ctx, n in specs]
    num_blocks = sum(need) + 16
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # blocks of a request are scattered over the pool, as after some churn
    tables = torch.zeros(len(specs), max(need), dtype=torch.int64)
    slots, qsl, seq_lens = [], [0], []
    for i, ((ctx, n), nb) in enumerate(zip(specs, need)):
        tables[i, :nb] = torch.tensor(ids[:nb])
        ids = ids[nb:]
        slots += [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(ctx, ctx + n)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(ctx + n)
    tables[:, : shared_prefix // BLOCK] = tables[0, : shared_prefix // BLOCK].clone()
    t = qsl[-1]
    caches = [torch.randn(kv_cache_shape(num_blocks, BLOCK, KVH, D), generator=g).to(dtype) for _ in range(num_layers)]
    q = torch.randn(t, H, D, generator=g).to(dtype)
    k = torch.randn(t, KVH, D, generator=g).to(dtype)
    v = torch.randn(t, KVH, D, generator=g).to(dtype)
    inputs = AttentionInputs(torch.tensor(slots), qsl, seq_lens, tables, BLOCK)
    return q, k, v, caches, inputs


def timeit(fns, seconds: float, rounds: int = 9) -> list[float]:
    """Per-call seconds of each fn: the best of `rounds` rounds, the fns interleaved round by round
    (this machine is shared: the best round is the one least disturbed, for every fn alike)."""
    for fn in fns:
        fn()
        fn()  # warm up
    reps = []
    for fn in fns:  # calls per round: about seconds / rounds
        start, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - start < seconds / rounds / 2:
            fn()
            n += 1
        reps.append(max(2, int(n * (seconds / rounds) / (time.perf_counter() - start))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (fn, n) in enumerate(zip(fns, reps)):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return best


def bench(name, specs, dtype, seconds, num_layers, backends, shared_prefix=0):
    q, k, v, caches, inputs = make_step(specs, dtype, num_layers, shared_prefix=shared_prefix)
    calls, preps = [], []
    for backend in backends:
        md = backend.prepare(inputs)
        layer = [0]

        def call(backend=backend, md=md, layer=layer):
            backend.forward(q, k, v, caches[layer[0] % num_layers], md, D ** -0.5)
            layer[0] += 1

        calls.append(call)
        preps.append(lambda backend=backend: backend.prepare(inputs))
    with torch.inference_mode():
        tt, ct = timeit(calls, seconds)
        tp, cp = timeit(preps, seconds / 10)
    tokens = len(inputs.slot_mapping)
    ctx = sum(inputs.seq_lens)
    print(f"{name:<28} {tokens:>6} {ctx:>7} | {tt * 1e3:9.3f} {ct * 1e3:9.3f} {tt / ct:7.2f}x"
          f" | {tp * 1e6:8.0f} {cp * 1e6:8.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per backend per case")
    ap.add_argument("--layers", type=int, default=6, help="layer caches to rotate over")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = [TorchPagedAttention(), CpuPagedAttention()]
    rng = random.Random(0)

    def decodes(n):
        return [(rng.randrange(100, 500), 1) for _ in range(n)]

    cases = [
        ("decode x8", decodes(8)),
        ("decode x32", decodes(32)),
        ("decode x64", decodes(64)),
        ("prefill 4 x 256", [(0, 256)] * 4),
        ("prefill 1 x 1024", [(0, 1024)]),
        ("chunks 4 x 256 after 256", [(256, 256)] * 4),
        ("mixed 32 dec + 256 + 256@256", decodes(32) + [(0, 256), (256, 256)]),
        ("mixed 60 dec + 4 x 16 chunks", decodes(60) + [(rng.randrange(0, 300), 16) for _ in range(4)]),
    ]
    print(f"{args.dtype}, H={H} KVH={KVH} D={D} block={BLOCK}, {torch.get_num_threads()} threads; "
          f"per-layer call (write K/V + attend), ms; prepare() per step, us")
    print(f"{'case':<28} {'tokens':>6} {'ctx':>7} | {'torch':>9} {'cpu':>9} {'speedup':>8}"
          f" | {'prep-tch':>8} {'prep-cpu':>8}")
    for name, specs in cases:
        bench(name, specs, dtype, args.seconds, args.layers, backends)
    print(f"{'shared 512-token prefix':<28} {'':>6} {'':>7} | {'no pass':>9} {'pass':>9}")
    pair = [CpuPagedAttention(cascade=False), CpuPagedAttention(cascade=True)]
    for n in (16, 64, 128):
        specs = [(512 + rng.randrange(16, 200), 1) for _ in range(n)]
        bench(f"decode x{n}, shared 512", specs, dtype, args.seconds, args.layers, pair, shared_prefix=512)


if __name__ == "__main__":
    main()
