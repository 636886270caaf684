"""The fused elementwise kernels (csrc/fused_ops.cpp) against the plain-PyTorch code they replace.

RMSNorm differs from torch only in the order of its float32 sum, SiLU in the last bit of exp; the
residual add and RoPE round exactly where torch does, so they must match bit for bit (RoPE would
not if the compiler fused its products and sums into FMAs). Row counts cover one thread and the
parallel split; hidden sizes cover the AVX2 loops and their scalar tails. Every test skips (with
the compiler's reason) where the extension cannot be built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding


pytestmark = pytest.mark.usefixtures("two_threads")


DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 576), (7, 13), (300, 576), (64, 20)]  # (rows, hidden); 300 x 576 is split over threads


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-3)


def _norm(hidden: int, dtype: torch.dtype, ops) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5, ops)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm(ext, rows, hidden, dtype):
    torch.manual_seed(rows + hidden)
    wide = (torch.randn(rows, hidden + 5) * 3).to(dtype)
    x = wide[:, :hidden]  # rows of a wider tensor: a row stride other than the hidden size
    fused, plain = _norm(hidden, dtype, ext), _norm(hidden, dtype, None)
    plain.weight = fused.weight
    out = fused(x)
    assert out.is_contiguous() and out.dtype == dtype
    _close(out, plain(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_fused_add_rms_norm(ext, rows, hidden, dtype):
    torch.manual_seed(rows * hidden)
    x, residual = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    fused, plain = _norm(hidden, dtype, ext), _norm(hidden, dtype, None)
    plain.weight = fused.weight
    want_out, want_residual = plain(x, residual)
    x_in, residual_in = x.clone(), residual.clone()
    out, new_residual = fused(x_in, residual_in)
    assert out.data_ptr() == x_in.data_ptr() and new_residual.data_ptr() == residual_in.data_ptr()  # in place
    assert torch.equal(new_residual, want_residual)  # the add rounds as torch's does
    _close(out, want_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_silu_and_mul(ext, rows, hidden, dtype):
    torch.manual_seed(rows - hidden)
    gate_up = (torch.randn(rows, 2 * hidden) * 4).to(dtype)
    gate_up[0, :3] = torch.tensor([-100.0, 0.0, 90.0])  # far tails of exp
    out = ext.silu_and_mul(gate_up)
    gate, up = gate_up.split(hidden, dim=-1)
    _close(out, F.silu(gate) * up)


class _RopeConfig:
    hidden_size, num_attention_heads, head_dim, max_position_embeddings = 96, 4, 24, 512
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 24, 6])
def test_rotary_matches_torch_bitwise(ext, dtype, head_dim):
    cfg = _RopeConfig()
    cfg.head_dim = head_dim
    torch.manual_seed(head_dim)
    t, q_heads, kv_heads = 200, 9, 3
    qkv = (torch.randn(t, q_heads + 2 * kv_heads, head_dim) * 2).to(dtype)
    positions = torch.randint(0, 512, (t,))
    fused, plain = RotaryEmbedding(cfg, 512, ext), RotaryEmbedding(cfg, 512, None)
    qk = qkv[:, : q_heads + kv_heads]  # a strided view of the QKV projection's output
    want = plain.for_positions(positions, dtype)(qk.clone())
    v_before = qkv[:, q_heads + kv_heads:].clone()
    out = fused.for_positions(positions, dtype)(qk)
    assert out.data_ptr() == qkv.data_ptr()  # rotated in place
    assert torch.equal(out, want)
    assert torch.equal(qkv[:, q_heads + kv_heads:], v_before)  # the value heads are left alone


def test_bad_inputs(ext):
    x = torch.randn(4, 8)
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        ext.rms_norm(x.double(), w.double(), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous 1-d CPU tensor of the input's dtype and hidden size \(8\)"):
        ext.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="x and residual must be contiguous tensors of one shape and dtype"):
        ext.fused_add_rms_norm(x, torch.randn(4, 8).bfloat16(), w, 1e-5)
    with pytest.raises(RuntimeError, match="gate_up's last dimension must be even, got 7"):
        ext.silu_and_mul(torch.randn(2, 7))
    cos = sin = torch.ones(16, 8)
    qk = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match=r"positions\[1\] = 16 is outside the rotary tables \(16 positions\)"):
        ext.rotary_embedding(qk, torch.tensor([0, 16, 1]), cos, sin)
    with pytest.raises(RuntimeError, match="positions must be a contiguous int64"):
        ext.rotary_embedding(qk, torch.tensor([0, 1, 2], dtype=torch.int32), cos, sin)
    with pytest.raises(RuntimeError, match="head_dim must be even, got 7"):
        ext.rotary_embedding(torch.randn(3, 2, 7), torch.tensor([0, 1, 2]), torch.ones(16, 7), torch.ones(16, 7))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, 16), (4, 49152), (130, 1003)])
def test_argmax_matches_torch(ext, rows, vocab, dtype):
    """First index on ties and the first NaN, as torch.argmax; rows of a wider tensor (strided)."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab + 3, generator=g).to(dtype)[:, :vocab]
    top = x[0].max() + 1
    x[0, vocab - 1] = top
    x[0, min(2, vocab - 1)] = top  # a tie: the first one wins
    if rows > 1:
        x[-1, vocab // 2] = float("nan")
        x[-1, vocab - 1] = float("nan")
    assert ext.argmax(x).tolist() == x.argmax(-1).tolist()
    with pytest.raises(RuntimeError, match="logits must be float32 or bfloat16"):
        ext.argmax(x.double())


def test_sampler_widens_only_the_rows_that_need_it(ext):
    """bf16 logits through the extension's argmax: the tokens and logprobs of widening every row first."""
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.worker.sampler import Sampler, SamplingRow

    logits = (torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=3),
              SamplingParams(temperature=0, repetition_penalty=1.5), SamplingParams(temperature=0, min_tokens=2),
              SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.0, top_k=5, logprobs=0)]

    def rows():
        out = []
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            prompt = logits[i].float().topk(3).indices.tolist()  # penalised: the greedy choice moves
            out.append(SamplingRow(p.clone(all_stop_token_ids=frozenset({int(logits[3].float().argmax())})),
                                   gen, prompt, []))
        return out

    fast = Sampler(0, ext)(logits, rows())
    wide = Sampler(0)(logits.float(), rows())
    assert fast.token_ids == wide.token_ids
    assert fast.logprobs == wide.logprobs
    assert fast.token_ids[0] == int(logits[0].float().argmax())
    assert fast.token_ids[2] != int(logits[2].float().argmax())  # the penalty moved it
    assert fast.token_ids[3] != int(logits[3].float().argmax())  # min_tokens masked the stop token
