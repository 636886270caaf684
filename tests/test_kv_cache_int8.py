"""The opt-in int8 KV cache (kv_cache_dtype="int8"): every (token, KV head) row of K and V stored as
int8 with its own float32 scale inside its block (attention.kv_cache_shape(..., quantized=True)).

What must hold: the quantizer's error bound; the C++ kernel's writes are the torch quantizer's, byte
for byte; both backends' attention over an int8 cache is float attention over the dequantized cache
(to float32 rounding; to the int16 rounding of the queries and probabilities, ~2^-15 of a row's
largest, where the row path multiplies int16 pairs on an AVX512-VNNI CPU) on every path (decode rows, prompt tiles, the shared-prefix pass, windows,
soft-capping, the scalar reference); and an engine on an int8 cache runs, frees every block, and
gives the torch backend's tokens.
"""
from __future__ import annotations

import random

import pytest
import torch
from test_cpu_attention import HEADS, make_batch, make_shared_batch, mixed_specs

from tokenmill.config import EngineConfig
from tokenmill.models.layers.attention import (TorchPagedAttention, gather_kv, key_view, kv_cache_shape,
                                               quantize_rows, quantized_views, value_view)
from tokenmill.models.layers.cpu_attention import CpuPagedAttention

pytestmark = pytest.mark.usefixtures("two_threads")

# float32 queries: float32 rounding, plus the row path's int16 queries and probabilities where the
# CPU has AVX512-VNNI (observed up to ~1e-4); a missing or misplaced scale is off by far more.
F32_TOL = 5e-4


def dequantized(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows(x)
    return q.float() * s[..., None]


def test_quantize_rows_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 3, 50)[:, None, None]
    x[7, 1] = 0.0  # an all-zero row: scale 0, zeros, no NaN
    x[9, 0, 5] = 1e4  # an outlier sets its row's scale
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert int(q.abs().max()) == 127 and int(q[7, 1].abs().max()) == 0 and float(s[7, 1]) == 0.0
    torch.testing.assert_close(s, x.abs().amax(-1) / 127, rtol=0, atol=0)
    err = (q.float() * s[..., None] - x).abs()
    assert bool((err <= s[..., None] * 0.5 * (1 + 1e-6) + 1e-30).all())


def int8_copy(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float cache's int8 counterpart (each row quantized) and that int8 cache dequantized, as a
    float32 cache of the original layout: what the int8 kernels must attend over."""
    _, num_blocks, num_kv_heads, per_head = cache.shape
    block_size = per_head // head_dim
    q8 = torch.zeros(kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, quantized=True), dtype=torch.int8)
    keys, values, key_scales, value_scales = quantized_views(q8, head_dim)
    kq, ks = quantize_rows(key_view(cache, head_dim).transpose(-1, -2))  # [NB, KVH, BS, D]
    vq, vs = quantize_rows(value_view(cache, head_dim))
    keys.copy_(kq.transpose(-1, -2))
    values.copy_(vq)
    key_scales.copy_(ks)
    value_scales.copy_(vs)
    ref = torch.empty(cache.shape, dtype=torch.float32)
    key_view(ref, head_dim).copy_((kq.float() * ks[..., None]).transpose(-1, -2))
    value_view(ref, head_dim).copy_(vq.float() * vs[..., None])
    return q8, ref


def check_int8(q, k, v, cache, inputs, head_dim, tol, backend=None, **layer):
    """The cpu backend (and the torch one) over the int8 copy of cache vs float32 attention over the
    dequantized copy, the step's new K/V dequantized likewise; the new rows' int8 bytes must be the
    torch quantizer's."""
    q8, ref_cache = int8_copy(cache.float(), head_dim)
    scale = head_dim ** -0.5
    torch_backend, backend = TorchPagedAttention(), backend or CpuPagedAttention("kernel")
    with torch.inference_mode():
        ref = torch_backend.forward(q.float(), dequantized(k), dequantized(v), ref_cache,
                                    torch_backend.prepare(inputs), scale, **layer)
        cache_cpu, cache_torch = q8.clone(), q8.clone()
        out = backend.forward(q, k, v, cache_cpu, backend.prepare(inputs), scale, **layer)
        out_torch = torch_backend.forward(q.float(), k.float(), v.float(), cache_torch, torch_backend.prepare(inputs),
                                          scale, **layer)
    assert torch.equal(cache_cpu, cache_torch), "the kernel's int8 rows or scales differ from quantize_rows'"
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out_torch, ref, atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 8, 5])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}-KVH{h[1]}")
def test_mixed_batch(ext, heads, block_size, dtype):
    """Decodes (row path), fresh prompts and continuing chunks (tile path) in one step."""
    rng = random.Random(block_size * 10 + heads[0])
    specs = mixed_specs(rng, n_decode=12, n_fresh=2, n_cont=3)
    batch = make_batch(specs, *heads, 64, block_size, dtype, seed=block_size)
    check_int8(*batch, 64, F32_TOL if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("head_dim", [32, 40, 128])
def test_other_head_dims(ext, head_dim):
    specs = mixed_specs(random.Random(head_dim), n_decode=6, n_fresh=1, n_cont=1, max_ctx=200)
    check_int8(*make_batch(specs, 8, 2, head_dim, 16, torch.float32, seed=3), head_dim, F32_TOL)


@pytest.mark.parametrize("layer", [{"sliding_window": 40}, {"softcap": 5.0}], ids=["window", "softcap"])
def test_window_and_softcap(ext, layer):
    specs = mixed_specs(random.Random(11), n_decode=8, n_fresh=1, n_cont=2)
    check_int8(*make_batch(specs, 9, 3, 64, 16, torch.float32, seed=4), 64, F32_TOL, **layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_prefix_pass(ext, dtype):
    """Requests sharing their first blocks: the prefix pass reads the shared int8 blocks once."""
    rng = random.Random(5)
    specs = [(rng.randrange(96, 250), 1) for _ in range(20)] + [(100, 12)]
    batch = make_shared_batch(specs, [0] * len(specs), [6], 9, 3, 64, 16, dtype, seed=6)
    backend = CpuPagedAttention("kernel", cascade=True)
    check_int8(*batch, 64, F32_TOL if dtype == torch.float32 else 2e-2, backend=backend)
    md = backend.prepare(batch[4])
    assert backend.plan(md, 3, 3)[1].shape[0] > 0, "the batch took no shared-prefix pass"


def test_scalar_reference_path(ext):
    specs = mixed_specs(random.Random(3), n_decode=4, n_fresh=1, n_cont=2, max_ctx=100)
    q, k, v, cache, inputs = make_batch(specs, 9, 3, 20, 8, torch.float32, seed=1)
    q8, _ = int8_copy(cache, 20)
    backend = CpuPagedAttention()
    md = backend.prepare(inputs)
    plan = backend.plan(md, 3, 3)
    outs = [ext.forward(q, k, v, q8.clone(), md.slot_mapping, md.block_tables, md.query_start_loc, md.seq_lens,
                        *plan, 20 ** -0.5, simd=simd) for simd in (True, False)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_gather_kv_dequantizes(ext):
    cache = torch.randn(kv_cache_shape(6, 4, 2, 8))
    q8, ref = int8_copy(cache, 8)
    blocks, offsets = torch.tensor([[5, 0], [2, 2]]), torch.tensor([[3, 0], [1, 2]])
    k, v = gather_kv(q8, 8, blocks, offsets, torch.float32)
    k_ref, v_ref = gather_kv(ref, 8, blocks, offsets, torch.float32)
    assert k.shape == (2, 2, 2, 8)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_bad_caches_are_rejected(ext):
    q, k, v, cache, inputs = make_batch([(10, 1), (0, 5)], 9, 3, 64, 16, torch.float32, seed=2)
    backend = CpuPagedAttention()
    with pytest.raises(RuntimeError, match=r"block_size x \(head_dim \+ 4\)"):
        backend.forward(q, k, v, torch.zeros(2, 8, 3, 16 * 64, dtype=torch.int8), backend.prepare(inputs), 0.125)
    with pytest.raises(RuntimeError, match="q's dtype, or be int8"):
        backend.forward(q, k, v, torch.zeros(2, 8, 3, 16 * 64, dtype=torch.float16), backend.prepare(inputs), 0.125)
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'int8'\], got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")


def test_kv_bytes_per_block():
    from transformers import LlamaConfig

    from tokenmill.worker.kv_cache import allocate_kv_caches, kv_bytes_per_block

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    assert kv_bytes_per_block(config, 16, torch.int8) == 3 * 2 * 2 * 16 * (16 + 4)
    assert kv_bytes_per_block(config, 16, torch.bfloat16) == 3 * 2 * 2 * 16 * 16 * 2
    caches = allocate_kv_caches(config, 5, 16, torch.int8)
    assert len(caches) == 3 and caches[0].dtype == torch.int8 and caches[0].shape == (2, 5, 2, 16 * 20)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_engine_int8_cache(ext, tiny_llama_dir, preemption):
    """An engine on an int8 cache small enough to preempt (and, with swap, to copy int8 blocks out
    and back): the cpu backend gives the torch backend's greedy tokens (both read the same int8
    rows), and every block is freed."""
    from tokenmill import LLM, SamplingParams

    rng = random.Random(4)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randrange(20, 90))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens = {}
    for backend in ("cpu", "torch"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_dtype="int8", attention_backend=backend,
                  max_model_len=256, num_kv_blocks=24, preemption_mode=preemption, swap_space=1 << 22,
                  enable_admission_control=False)
        engine = llm.llm_engine
        assert engine.runner.kv_caches[0].dtype == torch.int8 and engine.runner.backend.name == backend
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outputs]
        assert all(len(t) == 40 for t in tokens[backend])
        assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small for every request"
        assert engine.num_used_blocks == 0
    assert tokens["cpu"] == tokens["torch"]
