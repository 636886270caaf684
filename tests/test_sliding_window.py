"""Sliding-window attention and logit soft-capping: the C++ kernel's new paths (row path, tile path,
shared-prefix pass, scalar reference, SDPA chunks) against the torch backend on random ragged
batches, the torch backend against a dense reference, and end to end a windowed Mistral against
transformers: prompts longer than the window, chunk boundaries inside it, decode past it."""
from __future__ import annotations

import random

import pytest
import torch
from helpers import hf_greedy
from test_cpu_attention import make_batch, make_shared_batch, mixed_specs

from tokenmill.models.layers.attention import TorchPagedAttention
from tokenmill.models.layers.cpu_attention import CpuPagedAttention

pytestmark = pytest.mark.usefixtures("two_threads")

OPTIONS = [(24, None), (None, 5.0), (7, 2.0), (1, None)]  # (window, softcap)
OPTION_IDS = ["window24", "softcap5", "window7-softcap2", "window1"]


def torch_and_kernel(q, k, v, cache, inputs, window, softcap, prefill="kernel", cascade=True, scale=0.125):
    ref_backend, backend = TorchPagedAttention(), CpuPagedAttention(prefill, cascade=cascade)
    md = backend.prepare(inputs)
    with torch.inference_mode():
        ref = ref_backend.forward(q, k, v, cache.clone(), ref_backend.prepare(inputs), scale, window, softcap)
        out = backend.forward(q, k, v, cache.clone(), md, scale, window, softcap)
    return out, ref, md


def dense_reference(q, k_all, v_all, positions, window, softcap, scale):
    """One request, every key in hand: q [L, H, D] at positions, keys 0..S-1."""
    group = q.shape[1] // k_all.shape[1]
    kk, vv = k_all.repeat_interleave(group, 1), v_all.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    key_pos = torch.arange(k_all.shape[0])
    mask = key_pos[None, :] <= positions[:, None]
    if window:
        mask &= key_pos[None, :] > positions[:, None] - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("window,softcap", OPTIONS, ids=OPTION_IDS)
def test_torch_backend_matches_dense(window, softcap):
    """The torch backend's window and soft-capping are transformers' (a dense masked softmax)."""
    specs = [(40, 1), (0, 30), (17, 9)]
    q, k, v, cache, inputs = make_batch(specs, 6, 2, 16, 8, torch.float32, seed=1)
    backend = TorchPagedAttention()
    out = backend.forward(q, k, v, cache, backend.prepare(inputs), 0.25, window, softcap)
    from tokenmill.models.layers.attention import key_view, value_view
    keys, values = key_view(cache, 16), value_view(cache, 16)
    for i, (ctx, n) in enumerate(specs):
        total = ctx + n
        pos = torch.arange(total)
        blocks, offs = inputs.block_tables[i, pos // 8], pos % 8
        k_all, v_all = keys[blocks, :, :, offs], values[blocks, :, offs]
        t0 = inputs.query_start_loc[i]
        exp = dense_reference(q[t0:t0 + n], k_all, v_all, torch.arange(ctx, total), window, softcap, 0.25)
        torch.testing.assert_close(out[t0:t0 + n], exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["H9-KVH3", "H4-KVH4"])
def test_kernel_matches_torch(ext, heads, block_size, window, softcap):
    """Random ragged batches (decodes, fresh prompts, chunks after cached tokens; row and tile
    paths), float32 to 1e-5, and the scalar reference too."""
    rng = random.Random(block_size * 7 + heads[0])
    for seed in range(2):
        specs = mixed_specs(rng, n_decode=6, n_fresh=2, n_cont=3, max_ctx=150)
        q, k, v, cache, inputs = make_batch(specs, *heads, 64, block_size, torch.float32, seed)
        out, ref, md = torch_and_kernel(q, k, v, cache, inputs, window, softcap)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        items, prefix = CpuPagedAttention().plan(md, heads[1], heads[0] // heads[1], windowed=bool(window))
        scalar = ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc,
                             md.seq_lens, items, prefix, 0.125, int(window or 0), float(softcap or 0), simd=False)
        torch.testing.assert_close(scalar, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", OPTIONS, ids=OPTION_IDS)
def test_kernel_bfloat16(ext, window, softcap):
    rng = random.Random(5)
    specs = mixed_specs(rng, n_decode=5, n_fresh=1, n_cont=2, max_ctx=120)
    q, k, v, cache, inputs = make_batch(specs, 9, 3, 64, 16, torch.bfloat16, seed=3)
    out, ref, _ = torch_and_kernel(q, k, v, cache, inputs, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window,softcap", OPTIONS, ids=OPTION_IDS)
def test_kernel_with_shared_prefixes(ext, window, softcap):
    """Requests sharing their first blocks: a soft-capped layer runs the shared-prefix pass (capped
    there too), a windowed layer is planned without it; both give the torch backend's result."""
    rng = random.Random(11)
    bs, p0 = 16, 6
    specs = [(rng.randrange(p0 * bs, p0 * bs + 100), 1) for _ in range(8)] + [(p0 * bs + 2, 20)]
    groups = [0] * 9
    q, k, v, cache, inputs = make_shared_batch(specs, groups, [p0], 9, 3, 64, bs, torch.float32, seed=2)
    out, ref, md = torch_and_kernel(q, k, v, cache, inputs, window, softcap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    backend = CpuPagedAttention("kernel")
    _, prefix = backend.plan(md, 3, 3, windowed=bool(window))
    assert (prefix.shape[0] > 0) == (not window)
    if not window:  # the pass really ran with the cap: without it the result differs
        plain = backend.forward(q, k, v, cache.clone(), backend.prepare(inputs), 0.125)
        assert not torch.allclose(plain, out, atol=1e-3)


def test_kernel_refuses_window_with_prefix_pass(ext):
    specs = [(100, 1)] * 8
    q, k, v, cache, inputs = make_shared_batch(specs, [0] * 8, [6], 9, 3, 64, 16, torch.float32, seed=4)
    backend = CpuPagedAttention("kernel")
    md = backend.prepare(inputs)
    items, prefix = backend.plan(md, 3, 3)
    assert prefix.shape[0] > 0
    with pytest.raises(RuntimeError, match="sliding-window layer takes no shared-prefix pass"):
        ext.forward(q, k, v, cache.clone(), md.slot_mapping, md.block_tables, md.query_start_loc, md.seq_lens,
                    items, prefix, 0.125, 24, 0.0)


@pytest.mark.parametrize("window,softcap", [(24, None), (None, 5.0)], ids=["window24", "softcap5"])
def test_sdpa_chunks(ext, window, softcap):
    """prefill="sdpa": chunks take SDPA with the window in the mask; soft-capped layers leave their
    chunks to the kernel (SDPA cannot cap)."""
    specs = [(0, 40), (30, 25), (50, 1), (10, 18)]
    q, k, v, cache, inputs = make_batch(specs, 9, 3, 64, 16, torch.float32, seed=6)
    out, ref, md = torch_and_kernel(q, k, v, cache, inputs, window, softcap, prefill="sdpa")
    assert md.chunks
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- end to end: a windowed Mistral ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory, default_model_dir):
    from conftest import _TINY, _save_tiny
    from transformers import MistralConfig

    config = MistralConfig(**_TINY, sliding_window=24, tie_word_embeddings=False, architectures=["MistralForCausalLM"])
    return _save_tiny(tmp_path_factory.mktemp("tiny-mistral-window"), config, default_model_dir)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_windowed_mistral_matches_hf(tiny_mistral_dir, backend, request):
    """Prompts longer than the 24-token window, a 10-token budget (chunk boundaries inside the
    window), decode well past it: transformers' tokens; every block free afterwards."""
    from tokenmill import LLM, SamplingParams

    if backend == "cpu":
        request.getfixturevalue("ext")
    rng = random.Random(3)
    lens = [30, 45, 26, 60, 9]
    prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in lens]
    llm = LLM(str(tiny_mistral_dir), dtype="float32", max_model_len=256, attention_backend=backend,
              max_num_batched_tokens=10)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, out in enumerate(outputs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_mistral_dir, prompts[i], 30), f"prompt {i} differs"
    assert llm.llm_engine.num_used_blocks == 0
