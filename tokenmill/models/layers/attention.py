"""Paged attention over a ragged batch: one small backend interface, a pure-PyTorch backend.

The batch is flat: the new tokens of all scheduled requests are concatenated (no padding), and
request i owns rows query_start_loc[i]:query_start_loc[i+1]. Each layer's cache is one tensor of
`kv_cache_shape(...)` = [2, num_blocks, num_kv_heads, block_size * head_dim]: per block and KV
head, the keys transposed (`key_view`: [num_blocks, num_kv_heads, head_dim, block_size], dim d of
the block's keys adjacent) and the values as rows (`value_view`: [..., block_size, head_dim]).
The CPU kernel reads a block's scores as one vector over its keys that way (see
csrc/paged_attention.cpp). Token p of request i lives in slot  block_tables[i][p // block_size] *
block_size + p % block_size. A layer first writes the new K/V into their slots (slot_mapping), then
each query attends causally over its own request's cached tokens, reached through the block table.

An 8-bit cache (kv_cache_dtype="int8") is an int8 tensor of `kv_cache_shape(..., quantized=True)` =
[2, num_blocks, num_kv_heads, block_size * (head_dim + 4)]: each (block, KV head) unit holds the
same keys and values as int8s (`quantized_views`), then one float32 scale per token, as four bytes
each. Every (token, head) row of K and of V is stored as round(x / s) with s = max|x| / 127
(`quantize_rows`), and read back as int8 * s. Both backends read it.

Two per-layer options go to `forward` (the metadata is per step and shared by every layer):
`sliding_window` W (a query at position p sees keys p - W + 1 .. p, as transformers' sliding-window
mask; Mistral's `sliding_window`, Gemma's local layers) and `softcap` c (scores become
c * tanh(score / c) before the mask and the softmax, as Gemma 2's attention logit soft-capping).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionInputs:
    """What every backend gets for one step (built once by the model runner, shared by layers)."""
    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot of each new token
    query_start_loc: list[int]  # [num_reqs + 1]
    seq_lens: list[int]  # [num_reqs]: context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_reqs, max_blocks] long, padded with 0
    block_size: int


class AttentionBackend(ABC):
    """Prepares per-step metadata once, then runs each layer's attention with it."""

    name: str

    @abstractmethod
    def prepare(self, inputs: AttentionInputs) -> object:
        """Derive whatever the backend needs for this step; the result is passed to forward()."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: object, scale: float, sliding_window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] (new tokens). Writes k, v to the cache; returns [T, H, D]."""


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   quantized: bool = False) -> tuple[int, ...]:
    """The shape of one layer's KV cache tensor (keys and values of every block); quantized: of an
    int8 cache, whose every key and value row carries a float32 scale (4 more bytes)."""
    return (2, num_blocks, num_kv_heads, block_size * (head_dim + 4 if quantized else head_dim))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scales [...]): per row, s = max|x| / 127 and
    q = round-half-even(x / s), float32 arithmetic (an all-zero row: s = 0, q = 0). The C++ kernel
    quantizes the same way, bit for bit."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, torch.round(x / scale[..., None]), 0.0)
    return q.to(torch.int8), scale


def quantized_views(kv_cache: torch.Tensor, head_dim: int):
    """An int8 cache as (keys [num_blocks, KVH, D, BS] int8, values [num_blocks, KVH, BS, D] int8,
    key scales [num_blocks, KVH, BS] float32, value scales [num_blocks, KVH, BS] float32)."""
    num_blocks, num_kv_heads, per_head = kv_cache.shape[1:]
    block_size = per_head // (head_dim + 4)
    data, scales = kv_cache[..., : block_size * head_dim], kv_cache[..., block_size * head_dim:].view(torch.float32)
    keys = data[0].unflatten(-1, (head_dim, block_size))
    values = data[1].unflatten(-1, (block_size, head_dim))
    return keys, values, scales[0], scales[1]


def key_view(kv_cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[num_blocks, num_kv_heads, head_dim, block_size]: the keys, transposed within each block."""
    num_blocks, num_kv_heads, per_head = kv_cache.shape[1:]
    return kv_cache[0].view(num_blocks, num_kv_heads, head_dim, per_head // head_dim)


def value_view(kv_cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[num_blocks, num_kv_heads, block_size, head_dim]: the values, one row per key."""
    num_blocks, num_kv_heads, per_head = kv_cache.shape[1:]
    return kv_cache[1].view(num_blocks, num_kv_heads, per_head // head_dim, head_dim)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D] into the cache slots slot_mapping [T] (an int8 cache: quantized)."""
    head_dim = k.shape[-1]
    if kv_cache.dtype == torch.int8:
        keys, values, key_scales, value_scales = quantized_views(kv_cache, head_dim)
        blocks, offsets = slot_mapping // keys.shape[-1], slot_mapping % keys.shape[-1]
        (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
        keys[blocks, :, :, offsets] = kq
        values[blocks, :, offsets] = vq
        key_scales[blocks, :, offsets] = ks
        value_scales[blocks, :, offsets] = vs
        return
    block_size = kv_cache.shape[-1] // head_dim
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_view(kv_cache, head_dim)[blocks, :, :, offsets] = k
    value_view(kv_cache, head_dim)[blocks, :, offsets] = v


def gather_kv(kv_cache: torch.Tensor, head_dim: int, blocks: torch.Tensor, offsets: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values at (blocks, offsets) (any matching index shape [...]), as [..., KVH, D] of
    `dtype` (an int8 cache: int8 * scale in float32, then rounded to dtype)."""
    if kv_cache.dtype == torch.int8:
        keys, values, key_scales, value_scales = quantized_views(kv_cache, head_dim)
        k = keys[blocks, :, :, offsets].float() * key_scales[blocks, :, offsets][..., None]
        v = values[blocks, :, offsets].float() * value_scales[blocks, :, offsets][..., None]
        return k.to(dtype), v.to(dtype)
    return key_view(kv_cache, head_dim)[blocks, :, :, offsets], value_view(kv_cache, head_dim)[blocks, :, offsets]


@dataclass
class _Group:
    """Requests attended together: queries padded to [B, Q], keys gathered to [B, S]."""
    row_index: torch.Tensor  # [T_g] flat row of each of the group's query tokens
    pad_index: torch.Tensor  # [T_g] its position in the flattened [B * Q] padded queries
    batch: int
    max_q: int
    key_blocks: torch.Tensor  # [B, S] cache block of every key position (0 where padded)
    key_offsets: torch.Tensor  # [B, S] its offset in the block
    mask: torch.Tensor  # [B, 1, Q, S] bool, True = attend
    q_pos: torch.Tensor  # [B, 1, Q, 1] position of each (padded) query row
    windowed: dict[int, torch.Tensor]  # sliding window -> mask with it, built by the first such layer

    def mask_for(self, window: int | None) -> torch.Tensor:
        if not window:
            return self.mask
        if window not in self.windowed:
            keys = torch.arange(self.mask.shape[-1])
            self.windowed[window] = self.mask & (keys > self.q_pos - window)
        return self.windowed[window]


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor
    groups: list[_Group]


class TorchPagedAttention(AttentionBackend):
    """Reference backend: plain PyTorch, batched with scaled_dot_product_attention.

    Decode tokens (one query per request) form one group with keys gathered per request and a
    length mask; prompt chunks form another, padded to the longest chunk, with a causal mask offset
    by the tokens already cached.
    """

    name = "torch"

    def prepare(self, inputs: AttentionInputs) -> TorchAttentionMetadata:
        qsl = inputs.query_start_loc
        q_lens = [qsl[i + 1] - qsl[i] for i in range(len(inputs.seq_lens))]
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        groups = [self._group(inputs, idx, q_lens) for idx in (decode, prefill) if idx]
        return TorchAttentionMetadata(inputs.slot_mapping, groups)

    @staticmethod
    def _group(inputs: AttentionInputs, reqs: list[int], q_lens: list[int]) -> _Group:
        bs = inputs.block_size
        seq_lens = torch.tensor([inputs.seq_lens[i] for i in reqs])
        lens = torch.tensor([q_lens[i] for i in reqs])
        starts = torch.tensor([inputs.query_start_loc[i] for i in reqs])
        batch, max_q, max_s = len(reqs), int(lens.max()), int(seq_lens.max())

        # Query rows: request b's j-th new token sits at flat row starts[b] + j, padded slot b*Q + j.
        b_of_tok = torch.repeat_interleave(torch.arange(batch), lens)
        j_of_tok = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        row_index = starts[b_of_tok] + j_of_tok
        pad_index = b_of_tok * max_q + j_of_tok

        pos = torch.arange(max_s)
        tables = inputs.block_tables[reqs][:, : (max_s + bs - 1) // bs]
        key_slots = tables[:, pos // bs] * bs + pos % bs  # [B, S]
        key_valid = pos[None, :] < seq_lens[:, None]
        key_slots = torch.where(key_valid, key_slots, 0)
        key_blocks, key_offsets = key_slots // bs, key_slots % bs

        # Query j of request b is at position ctx_b + j, ctx_b = tokens cached before this step.
        # Padded query rows get the position of the last real one (their output is dropped).
        ctx = seq_lens - lens
        j = torch.arange(max_q)
        q_pos = ctx[:, None] + torch.minimum(j[None, :], (lens - 1)[:, None])  # [B, Q]
        if max_q == 1:
            mask = key_valid[:, None, None, :]
        else:
            mask = (pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, Q, S]
        return _Group(row_index, pad_index, batch, max_q, key_blocks, key_offsets, mask, q_pos[:, None, :, None], {})

    def forward(self, q, k, v, kv_cache, metadata: TorchAttentionMetadata, scale, sliding_window=None, softcap=None):
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        head_dim = q.shape[-1]
        num_kv_heads = kv_cache.shape[2]
        out = torch.empty_like(q)
        num_heads = q.shape[1]
        for g in metadata.groups:
            qg = q.new_zeros(g.batch * g.max_q, num_heads, head_dim)
            qg[g.pad_index] = q[g.row_index]
            qg = qg.view(g.batch, g.max_q, num_heads, head_dim).transpose(1, 2)
            kg, vg = gather_kv(kv_cache, head_dim, g.key_blocks, g.key_offsets, q.dtype)
            kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [B, S, KVH, D] -> [B, KVH, S, D]
            mask = g.mask_for(sliding_window)
            if softcap:
                og = softcapped_attention(qg, kg, vg, mask, scale, softcap)
            else:
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                                    enable_gqa=num_heads != num_kv_heads)
            og = og.transpose(1, 2).reshape(g.batch * g.max_q, num_heads, head_dim)
            out[g.row_index] = og[g.pad_index]
        return out


def softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores, as transformers' eager Gemma 2 attention computes it:
    scores * scale, / cap, tanh, * cap, masked, softmax in float32. q: [B, H, Q, D]; k, v: [B, KVH,
    S, D]; mask: bool, True = attend."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchPagedAttention}
# Backends whose modules import this one, added to BACKENDS on first use (no import cycle):
# name -> (module, class). "cpu" builds a C++ extension the first time (see cpu_attention.py).
LAZY_BACKENDS: dict[str, tuple[str, str]] = {"cpu": ("tokenmill.models.layers.cpu_attention", "CpuPagedAttention")}


def get_attention_backend(name: str, **options) -> AttentionBackend:
    """The backend `name`, constructed with `options` (the cpu backend takes `prefill`)."""
    if name not in BACKENDS and name in LAZY_BACKENDS:
        import importlib

        module, cls = LAZY_BACKENDS[name]
        BACKENDS[name] = getattr(importlib.import_module(module), cls)
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS.keys() | LAZY_BACKENDS.keys())}, "
                         f"got {name!r}") from None
    return cls(**options)
