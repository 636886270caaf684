"""The C++ CPU paged-attention backend against the torch (SDPA) backend, and end to end against HF.

Random ragged batches mix decode tokens, prompt chunks starting at position 0 and chunks continuing
after cached tokens, over shuffled, non-contiguous blocks; both backends write the new K/V and
attend, and must agree: float32 to ~1e-5, bfloat16 to bf16 rounding. Every test skips (with the
compiler's reason) where the extension cannot be built.
"""
from __future__ import annotations

import random

import pytest
import torch
from helpers import hf_greedy

from tokenmill.models.layers.attention import (AttentionInputs, TorchPagedAttention, get_attention_backend,
                                               kv_cache_shape)
from tokenmill.models.layers.cpu_attention import CpuPagedAttention
from tokenmill.models.layers.cpu_ops import cpu_ops_available


pytestmark = pytest.mark.usefixtures("two_threads")


def make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """specs: (cached tokens, new tokens) per request. Returns q, k, v, a cache holding random K/V
    for the cached tokens, and the AttentionInputs of the step (blocks shuffled across requests)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-(ctx + n) // block_size) for ctx, n in specs]
    num_blocks = sum(need) + 7  # spare blocks: random values that must never be read
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    max_blocks = max(need) + 2  # wider than needed: the padding must be ignored
    tables = torch.zeros(len(specs), max_blocks, dtype=torch.int64)
    cache = torch.randn(kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), generator=g).to(dtype)
    slots, qsl, seq_lens = [], [0], []
    for i, ((ctx, n), nb) in enumerate(zip(specs, need)):
        tables[i, :nb] = torch.tensor(ids[:nb])
        ids = ids[nb:]
        for pos in range(ctx, ctx + n):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
        qsl.append(qsl[-1] + n)
        seq_lens.append(ctx + n)
    t = qsl[-1]
    q = torch.randn(t, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, num_kv_heads, head_dim, generator=g).to(dtype)
    inputs = AttentionInputs(slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=qsl,
                             seq_lens=seq_lens, block_tables=tables, block_size=block_size)
    return q, k, v, cache, inputs


def run_both(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, prefill="kernel"):
    q, k, v, cache, inputs = make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    scale = head_dim ** -0.5
    torch_backend, cpu_backend = TorchPagedAttention(), CpuPagedAttention(prefill)
    cache_ref, cache_cpu = cache.clone(), cache.clone()
    with torch.inference_mode():
        ref = torch_backend.forward(q, k, v, cache_ref, torch_backend.prepare(inputs), scale)
        out = cpu_backend.forward(q, k, v, cache_cpu, cpu_backend.prepare(inputs), scale)
    assert torch.equal(cache_cpu, cache_ref), "the new K/V were not written to the same slots"
    return out, ref, (q, k, v, cache, inputs)


def mixed_specs(rng: random.Random, n_decode: int, n_fresh: int, n_cont: int, max_ctx: int = 300):
    specs = [(rng.randrange(1, max_ctx), 1) for _ in range(n_decode)]
    specs += [(0, rng.randrange(2, 120)) for _ in range(n_fresh)]
    specs += [(rng.randrange(1, max_ctx), rng.randrange(2, 90)) for _ in range(n_cont)]
    rng.shuffle(specs)
    return specs


HEADS = [(9, 3), (4, 4), (6, 2)]  # GQA group 3 (the default model), 1 (MHA), 3 with other counts


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}-KVH{h[1]}")
def test_mixed_batch_float32(ext, heads, block_size):
    rng = random.Random(block_size * 100 + heads[0])
    for trial in range(3):
        specs = mixed_specs(rng, n_decode=6, n_fresh=2, n_cont=3)
        out, ref, _ = run_both(specs, *heads, 64, block_size, torch.float32, seed=trial)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 5])
def test_prompt_chunks_by_sdpa(ext, dtype, block_size):
    """prefill="sdpa": the chunks (fresh and after cached tokens, 16 rows and more) through torch's
    SDPA, short chunks and decodes through the kernel; the same outputs as the torch backend."""
    rng = random.Random(block_size)
    specs = mixed_specs(rng, n_decode=7, n_fresh=2, n_cont=3) + [(0, 16), (40, 15), (33, 70)]
    out, ref, (q, k, v, cache, inputs) = run_both(specs, 9, 3, 64, block_size, dtype, prefill="sdpa")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    backend = CpuPagedAttention("sdpa")
    md = backend.prepare(inputs)
    chunk_rows = {(c.t0, c.t1) for c in md.chunks}
    qsl = inputs.query_start_loc
    assert chunk_rows == {(qsl[i], qsl[i + 1]) for i in range(len(specs)) if qsl[i + 1] - qsl[i] >= 16}
    assert all(int(qsl[r + 1] - qsl[r]) < 16 for r in backend.plan(md, 3, 3, sdpa=True)[0][:, 0].tolist())
    assert backend.uses_sdpa(torch.float32) and not CpuPagedAttention("kernel").uses_sdpa(torch.bfloat16)
    with pytest.raises(ValueError, match="prefill_attention must be one of"):
        CpuPagedAttention("flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_decode", [5, 40])
def test_decode_heavy_batch(ext, n_decode, dtype):
    """Few decodes: one work item per KV head; many: one item covers all KV heads of a token."""
    rng = random.Random(n_decode)
    specs = mixed_specs(rng, n_decode=n_decode, n_fresh=1, n_cont=1, max_ctx=400)
    out, ref, (q, k, v, cache, inputs) = run_both(specs, 9, 3, 64, 16, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    backend = CpuPagedAttention()
    plan, prefix_plan = backend.plan(backend.prepare(inputs), 3, 3)
    assert prefix_plan.shape == (0, 5)  # no request shares blocks with another
    assert int(plan[:, 4].max()) == (3 if n_decode >= 8 else 1)
    # The items cover every (token, KV head) exactly once.
    covered = torch.zeros(q.shape[0], 3, dtype=torch.int64)
    qsl = inputs.query_start_loc
    for req, j0, qn, h0, nh, k0 in plan.tolist():
        assert k0 == 0
        covered[qsl[req] + j0: qsl[req] + j0 + qn, h0: h0 + nh] += 1
    assert bool((covered == 1).all())


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("heads", HEADS[:2], ids=lambda h: f"H{h[0]}-KVH{h[1]}")
def test_mixed_batch_bfloat16(ext, heads, block_size):
    rng = random.Random(7 + block_size)
    specs = mixed_specs(rng, n_decode=6, n_fresh=2, n_cont=3)
    out, ref, (q, k, v, cache, inputs) = run_both(specs, *heads, 64, block_size, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # Against a float32 computation from the same bf16 inputs: only the final rounding differs.
    f32 = TorchPagedAttention()
    with torch.inference_mode():
        ref32 = f32.forward(q.float(), k.float(), v.float(), cache.float(), f32.prepare(inputs), 64 ** -0.5)
    torch.testing.assert_close(out.float(), ref32, atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("specs", [
    [(0, 1)],  # the very first token of a prompt
    [(0, 300)],  # one long prompt: several query tiles and key tiles
    [(250, 1)] * 3 + [(0, 2), (17, 2), (5, 3)],  # decodes and tiny chunks (row path, per-row masks)
    [(31, 45), (16, 16), (15, 17), (1, 64)],  # chunks around block boundaries
    [(rng_ctx, 1) for rng_ctx in (1, 15, 16, 17, 31, 32, 33, 511)],  # decode lengths around tiles
], ids=["first-token", "long-prompt", "decode-and-tiny", "block-edges", "decode-lengths"])
def test_edge_shapes(ext, specs):
    for block_size in (16, 8, 5):
        out, ref, _ = run_both(specs, 9, 3, 64, block_size, torch.float32)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 20, 40, 128])
def test_other_head_dims(ext, head_dim):
    """Head dims that exercise the vector tails (not multiples of 8 / 16 / 32)."""
    rng = random.Random(head_dim)
    specs = mixed_specs(rng, n_decode=4, n_fresh=1, n_cont=2, max_ctx=100)
    for heads in [(9, 3), (2, 1)]:
        out, ref, _ = run_both(specs, *heads, head_dim, 16, torch.float32)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32, 8])
@pytest.mark.parametrize("head_dim", [32, 128, 40])
def test_bfloat16_decode_shapes(ext, head_dim, block_size):
    """bf16 decodes and short chunks (the row path) over the shapes its bf16-pair kernels split on
    where the CPU has AVX512-BF16: one or two 64-dim value passes and a 32-dim one (head_dim 32,
    128), 16-key groups read as one or two runs (block 16, 32), and the widening fallback (head_dim
    40, block 8); odd key counts in the last block throughout."""
    rng = random.Random(head_dim + block_size)
    specs = [(rng.randrange(1, 200), 1) for _ in range(12)] + [(rng.randrange(1, 200), 2) for _ in range(3)]
    for heads in [(9, 3), (4, 4)]:
        out, ref, _ = run_both(specs, *heads, head_dim, block_size, torch.bfloat16)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_scalar_reference_path(ext):
    """The portable scalar kernel (used where AVX2/FMA are missing) agrees as well."""
    rng = random.Random(3)
    specs = mixed_specs(rng, n_decode=4, n_fresh=1, n_cont=2, max_ctx=100)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v, cache, inputs = make_batch(specs, 9, 3, 20, 8, dtype, seed=1)
        backend = CpuPagedAttention()
        md = backend.prepare(inputs)
        plan = backend.plan(md, 3, 3)
        simd = ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc,
                           md.seq_lens, *plan, 20 ** -0.5, simd=True)
        scalar = ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc,
                             md.seq_lens, *plan, 20 ** -0.5, simd=False)
        torch.testing.assert_close(scalar.float(), simd.float(), atol=tol, rtol=tol)


def test_int32_tables_noncontiguous_q_and_plan_reuse(ext):
    specs = [(40, 1), (0, 33), (20, 7)]
    q, k, v, cache, inputs = make_batch(specs, 9, 3, 64, 16, torch.float32, seed=5)
    ref_backend = TorchPagedAttention()
    with torch.inference_mode():
        ref = ref_backend.forward(q, k, v, cache.clone(), ref_backend.prepare(inputs), 0.125)
    backend = CpuPagedAttention()
    inputs.block_tables = inputs.block_tables.to(torch.int32)
    md = backend.prepare(inputs)
    q_strided = torch.empty(q.shape[0], q.shape[1], 2 * q.shape[2])[..., ::2]  # last dim not contiguous
    q_strided.copy_(q)
    q_heads = torch.empty(q.shape[1], q.shape[0], q.shape[2]).transpose(0, 1)  # heads-major strides
    q_heads.copy_(q)
    for qq in (q_strided, q_heads, q):  # the second and third calls reuse the step's plan
        out = backend.forward(qq, k, v, cache.clone(), md, 0.125)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert list(md.plans) == [(3, 3, False, False)]


def test_bad_inputs_are_rejected(ext):
    specs = [(10, 1), (0, 5)]
    q, k, v, cache, inputs = make_batch(specs, 9, 3, 64, 16, torch.float32, seed=2)
    backend = CpuPagedAttention()
    md = backend.prepare(inputs)
    md.block_tables = md.block_tables.clone()
    md.block_tables[0, 0] = cache.shape[1]  # a block id past the cache
    with pytest.raises(RuntimeError, match="out of range"):
        backend.forward(q, k, v, cache, md, 0.125)
    md = backend.prepare(inputs)
    with pytest.raises(RuntimeError, match="q's dtype, or be int8"):
        backend.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache, md, 0.125)
    md.slot_mapping = md.slot_mapping + cache.shape[1] * 16  # past the last block (block size 16)
    with pytest.raises(RuntimeError, match="out of range"):
        backend.forward(q, k, v, cache, md, 0.125)


def make_shared_batch(specs, groups, prefix_blocks, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """make_batch, where the requests with the same group id (None: no group) hold the same first
    prefix_blocks[group] physical blocks, as the prefix cache shares a cached prompt prefix."""
    q, k, v, cache, inputs = make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    tables = inputs.block_tables
    first = {}
    for i, gid in enumerate(groups):
        if gid is None:
            continue
        n = prefix_blocks[gid]
        assert specs[i][0] >= n * block_size, "a request shares only blocks before its queries"
        first.setdefault(gid, tables[i, :n].clone())
        tables[i, :n] = first[gid]  # its own first blocks are left unused
    return q, k, v, cache, inputs


def run_shared(specs, groups, prefix_blocks, heads, block_size, dtype, seed=0, cascade=True):
    q, k, v, cache, inputs = make_shared_batch(specs, groups, prefix_blocks, *heads, 64, block_size, dtype, seed)
    torch_backend, backend = TorchPagedAttention(), CpuPagedAttention("kernel", cascade=cascade)
    md = backend.prepare(inputs)
    with torch.inference_mode():
        ref = torch_backend.forward(q, k, v, cache.clone(), torch_backend.prepare(inputs), 64 ** -0.5)
        out = backend.forward(q, k, v, cache.clone(), md, 64 ** -0.5)
    kvh = heads[1]
    return out, ref, backend.plan(md, kvh, heads[0] // kvh), inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}-KVH{h[1]}")
def test_shared_prefix_pass(ext, heads, block_size, dtype):
    """Decodes and chunks of requests that share their first blocks: the prefix is attended once
    for the whole group (the prefix plan), each request's items continue from its state, and the
    result is the torch backend's. Two groups, a request between them that shares nothing, and a
    group member that shares a shorter prefix than the rest."""
    rng = random.Random(block_size + heads[0])
    p0, p1 = 96 // block_size, 70 // block_size  # prefix blocks of groups 0 and 1
    specs, groups = [], []
    for _ in range(9):  # group 0: decodes, one chunk continuing after the prefix
        specs.append((rng.randrange(p0 * block_size, p0 * block_size + 150), 1))
        groups.append(0)
    specs.insert(4, (p0 * block_size + 3, 30))
    groups.insert(4, 0)
    specs.append((200, 1))  # shares nothing
    groups.append(None)
    for _ in range(8):  # group 1: short chunks (16 query rows even without GQA)
        specs.append((rng.randrange(p1 * block_size, 300), 2))
        groups.append(1)
    out, ref, (items, prefix), inputs = run_shared(specs, groups, [p0, p1], heads, block_size, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # The prefix plan covers every token of both groups on every KV head once, with its group's keys.
    qsl, kvh = inputs.query_start_loc, heads[1]
    covered = torch.zeros(qsl[-1], kvh, dtype=torch.int64)
    keys = torch.zeros(qsl[-1], dtype=torch.int64)
    for req, t0, n, h, k0 in prefix.tolist():
        covered[t0:t0 + n, h] += 1
        keys[t0:t0 + n] = k0
    expect_keys = torch.zeros(qsl[-1], dtype=torch.int64)
    for i, gid in enumerate(groups):
        if gid is not None:
            expect_keys[qsl[i]:qsl[i + 1]] = [p0, p1][gid] * block_size
    assert torch.equal(covered, (expect_keys > 0).long()[:, None].expand(-1, kvh))
    assert torch.equal(keys, expect_keys)
    for req, j0, qn, h0, nh, k0 in items.tolist():  # each request's items start after its prefix
        assert k0 == int(expect_keys[qsl[req]])
    # Without the shared pass: no prefix plan, the same attention.
    plain, _, (items, prefix), _ = run_shared(specs, groups, [p0, p1], heads, block_size, dtype, cascade=False)
    assert prefix.shape[0] == 0 and int(items[:, 5].max()) == 0
    torch.testing.assert_close(plain.float(), ref.float(), atol=tol, rtol=tol)


def test_shared_prefix_grouping(ext):
    """Which requests share a pass: a member that shares only a short prefix ends the group (the
    group would save fewer blocks with it); groups too small to be worth a pass, prefixes shorter
    than the minimum and chunks left to SDPA get none; the scalar reference ignores the pass."""
    bs = 16
    specs = [(200, 1)] * 8 + [(200, 1)] + [(200, 1)] * 8
    groups = [0] * 8 + [1] + [0] * 8
    q, k, v, cache, inputs = make_shared_batch(specs, groups, [10, 4], 9, 3, 64, bs, torch.float32, seed=3)
    inputs.block_tables[8, :4] = inputs.block_tables[0, :4]  # request 8 shares 4 of group 0's 10 blocks
    backend = CpuPagedAttention("kernel")
    md = backend.prepare(inputs)
    items, prefix = backend.plan(md, 3, 3)
    firsts = {i: k0 for i, _, _, _, _, k0 in items.tolist()}
    assert [firsts[i] for i in range(17)] == [160] * 8 + [0] + [160] * 8  # two groups of 8, request 8 alone
    assert sorted({(t0, k0) for _, t0, _, _, k0 in prefix.tolist()}) == [(0, 160), (9, 160)]
    with torch.inference_mode():
        ref = TorchPagedAttention().forward(q, k, v, cache.clone(), TorchPagedAttention().prepare(inputs), 0.125)
        out = backend.forward(q, k, v, cache.clone(), md, 0.125)
        scalar = ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc,
                             md.seq_lens, items, prefix, 0.125, simd=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scalar, ref, atol=1e-5, rtol=1e-5)
    # Items that continue a pass the prefix plan does not run are refused, not read from garbage.
    for bad in (prefix[:0], prefix[1:]):
        with pytest.raises(RuntimeError, match="prefix_plan does not cover its rows"):
            ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc,
                        md.seq_lens, items, bad.contiguous(), 0.125)
    # 5 decodes x group 3 = 15 query rows: not worth a pass; 6 are.
    for n, expect in ((5, 0), (6, 3)):
        _, _, _, _, small = make_shared_batch([(100, 1)] * n, [0] * n, [6], 9, 3, 64, bs, torch.float32, seed=4)
        assert backend.plan(backend.prepare(small), 3, 3)[1].shape[0] == expect
    # A 48-token prefix is shorter than the minimum (SHARED_PREFIX_MIN_TOKENS = 64).
    _, _, _, _, short = make_shared_batch([(100, 1)] * 8, [0] * 8, [3], 9, 3, 64, bs, torch.float32, seed=5)
    assert backend.plan(backend.prepare(short), 3, 3)[1].shape[0] == 0
    # Chunks that SDPA takes are not the kernel's rows: they join no group.
    _, _, _, _, chunks = make_shared_batch([(100, 20)] * 4, [0] * 4, [6], 9, 3, 64, bs, torch.float32, seed=6)
    sdpa = CpuPagedAttention("sdpa")
    md = sdpa.prepare(chunks)
    assert sdpa.plan(md, 3, 3, sdpa=True)[1].shape[0] == 0 and sdpa.plan(md, 3, 3)[1].shape[0] > 0


def test_registered_backend(ext):
    assert cpu_ops_available()
    assert isinstance(get_attention_backend("cpu"), CpuPagedAttention)


# ---- end to end: greedy float32 tokens equal transformers' ---------------------------------------

@pytest.mark.parametrize("budget,prefill", [(None, "kernel"), (16, "kernel"), (None, "sdpa"), (48, "sdpa")],
                         ids=["default-budget", "chunked-16", "sdpa-prefill", "sdpa-chunked-48"])
def test_engine_matches_hf(ext, tiny_llama_dir, monkeypatch, budget, prefill):
    import tokenmill.engine.llm_engine as llm_engine
    from tokenmill import LLM, SamplingParams
    from tokenmill.worker.kv_cache import kv_bytes_per_block
    from transformers import AutoConfig

    monkeypatch.setattr(llm_engine, "get_attention_backend", lambda name, **options: CpuPagedAttention(**options))
    rng = random.Random(99)
    lens, max_tokens = [5, 17, 140, 31, 64, 90], [24, 7, 12, 20, 1, 16]
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in lens]
    kv_memory = 128 * kv_bytes_per_block(AutoConfig.from_pretrained(tiny_llama_dir), 16, torch.float32)
    args = dict(max_model_len=512, kv_cache_memory=kv_memory, prefill_attention=prefill)
    if budget:
        args["max_num_batched_tokens"] = budget
    llm = LLM(str(tiny_llama_dir), dtype="float32", **args)
    assert llm.llm_engine.runner.backend.name == "cpu"
    assert llm.llm_engine.runner.model.model.norm.ops is ext  # and the fused elementwise kernels
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    expected = [hf_greedy(tiny_llama_dir, p, k) for p, k in zip(prompts, max_tokens)]
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].token_ids == exp, f"prompt {i} ({lens[i]} tokens) differs from transformers"
    assert llm.llm_engine.num_used_blocks == 0


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no-cascade"])
def test_engine_shared_prefix_matches_hf(ext, tiny_llama_dir, monkeypatch, cascade):
    """Requests that share a cached 80-token system prompt decode together: with the shared-prefix
    pass their steps attend the prefix once for the group, and the tokens are still transformers'."""
    import tokenmill.engine.llm_engine as llm_engine
    from tokenmill import LLM, SamplingParams

    shared = []
    original_plan = CpuPagedAttention.plan

    def recording_plan(self, metadata, *args, **kwargs):
        items, prefix = original_plan(self, metadata, *args, **kwargs)
        shared.append(prefix.shape[0] > 0)
        return items, prefix

    monkeypatch.setattr(CpuPagedAttention, "plan", recording_plan)
    monkeypatch.setattr(llm_engine, "get_attention_backend", lambda name, **options: CpuPagedAttention(**options))
    rng = random.Random(7)
    system = [rng.randrange(100, 49000) for _ in range(80)]
    prompts = [system + [rng.randrange(100, 49000) for _ in range(rng.randrange(3, 40))] for _ in range(10)]
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, cascade_attention=cascade)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # caches the system prompt
    shared.clear()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    assert any(shared) == cascade
    for i, out in enumerate(outputs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_llama_dir, prompts[i + 1], 12), f"prompt {i + 1} differs"
    assert llm.llm_engine.num_used_blocks == 0


def test_build_failure_is_reported_once(ext, tmp_path, monkeypatch, caplog):
    """A source that does not compile: unavailable, one warning carrying the compiler's error."""
    import shutil

    import tokenmill.models.layers.cpu_ops as cpu_ops

    broken = tmp_path / "csrc"
    shutil.copytree(cpu_ops.SOURCE_DIR, broken)
    (broken / "paged_attention.cpp").write_text('#error "deliberately broken for the test"\n')
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ops, "SOURCE_DIR", broken)
    for name, value in (("_module", None), ("_error", None), ("_warned", False)):
        monkeypatch.setattr(cpu_ops, name, value)
    with caplog.at_level("WARNING", logger=cpu_ops.__name__):
        assert not cpu_ops.cpu_ops_available()
        assert not cpu_ops.cpu_ops_available()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "deliberately broken" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="cannot build"):
        CpuPagedAttention()
