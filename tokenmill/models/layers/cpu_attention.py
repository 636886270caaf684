"""CPU paged attention backend: a C++ kernel that reads K/V straight from the paged cache.

The torch backend gathers every request's keys and values through its block table into a padded
copy on every layer of every step; this one hands the cache, the block tables and the ragged batch
to `tokenmill/csrc/paged_attention.cpp`, which walks the block tables itself (all requests of the
step, decode tokens and prompt chunks alike, in one parallel call; see the comment at the top of
the .cpp for the work split and the vectorisation). The kernel is part of tokenmill's CPU
extension (see cpu_ops.py for how it is built).

Prompt chunks can instead go to torch's scaled_dot_product_attention over the chunk's gathered
K/V (`prefill="sdpa"`): where the CPU has AMX, torch's flash-attention kernel runs bfloat16
chunks on the matrix units, which the vector kernel cannot use. The kernel still writes every
new K/V and attends the decode tokens; SDPA fills the chunks' rows. `prefill="auto"` takes SDPA
for bfloat16 chunks on AMX CPUs and the kernel everywhere else (on AVX-512 and AVX2 CPUs without
AMX the kernel is the faster of the two for every chunk shape `benchmarks/attention.py` measures).

Shared prefixes (`cascade=True`): where consecutive requests of the step hold the same first blocks
(a prompt prefix the prefix cache shares) and all their query tokens lie after them, the kernel
attends those blocks once for all the group's query rows, as one matrix-shaped pass, and each
request's own items continue that pass's softmax state over the rest of its keys: the
log-sum-exp merge of cascade attention, done in place, so the result is the same attention (to
float32 rounding). Decode steps of requests that share a long system prompt read the prefix's K/V
once per step instead of once per request.

An int8 cache (kv_cache_dtype="int8"; layout in attention.py) goes to the same kernel, which reads
the int8s and their scales in place; its prompt chunks never go to SDPA.

Sliding-window layers (`sliding_window`) and soft-capped ones (`softcap`) are arguments of the same
kernel. A windowed layer is planned without the shared-prefix pass (its queries do not see the
whole prefix), so its plan is cached apart; SDPA takes a windowed layer's chunks with the window in
its mask, and no soft-capped layer's chunks (SDPA has no soft-capping).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.models.layers.attention import AttentionBackend, AttentionInputs, key_view, value_view
from tokenmill.models.layers.cpu_ops import cpu_has_amx, load_extension

PREFILL_MODES = ("auto", "kernel", "sdpa")
SDPA_MIN_CHUNK = 16  # shorter chunks stay with the kernel: a few rows are no matrix work
SHARED_PREFIX_MIN_TOKENS = 64  # shorter shared prefixes are attended per request


@dataclass
class _Chunk:
    """A prompt chunk attended by SDPA: rows t0:t1 of the step, keys 0:seq_len of its blocks."""
    t0: int
    t1: int
    seq_len: int
    blocks: torch.Tensor  # int64 [ceil(seq_len / block_size)]


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int64/int32 [R, max_blocks], contiguous
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    chunks: list[_Chunk]  # the prompt chunks SDPA may take
    block_size: int
    # Work items per (num_kv_heads, group, chunks left to SDPA, windowed): (items, shared-prefix
    # items), built by the first layer of each kind, reused.
    plans: dict[tuple[int, int, bool, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class CpuPagedAttention(AttentionBackend):
    """Paged attention by the C++ kernel: no gather, no padding, one parallel call per layer."""

    name = "cpu"

    def __init__(self, prefill: str = "auto", cascade: bool = True) -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill_attention must be one of {list(PREFILL_MODES)}, got {prefill!r}")
        self._ops = load_extension()
        self.prefill = prefill
        self.cascade = cascade
        # Whether any dtype goes to SDPA (else prepare() collects no chunks for it).
        self._may_use_sdpa = prefill == "sdpa" or (prefill == "auto" and cpu_has_amx())

    def uses_sdpa(self, dtype: torch.dtype) -> bool:
        if self.prefill == "auto":
            return dtype == torch.bfloat16 and cpu_has_amx()
        return self.prefill == "sdpa"

    def prepare(self, inputs: AttentionInputs) -> CpuAttentionMetadata:
        qsl, bs = inputs.query_start_loc, inputs.block_size
        chunks = [_Chunk(qsl[i], qsl[i + 1], n, inputs.block_tables[i, : -(-n // bs)].to(torch.int64))
                  for i, n in enumerate(inputs.seq_lens) if qsl[i + 1] - qsl[i] >= SDPA_MIN_CHUNK
                  ] if self._may_use_sdpa else []
        return CpuAttentionMetadata(
            slot_mapping=inputs.slot_mapping.to(torch.int64).contiguous(),
            block_tables=inputs.block_tables.contiguous(),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.int32),
            chunks=chunks,
            block_size=bs,
        )

    def plan(self, metadata: CpuAttentionMetadata, num_kv_heads: int, group: int,
             sdpa: bool = False, windowed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's work items for these head counts: (items, shared-prefix items); with
        sdpa, the chunks SDPA takes are left out; windowed: no shared-prefix pass."""
        key = (num_kv_heads, group, sdpa and bool(metadata.chunks), windowed)
        plan = metadata.plans.get(key)
        if plan is None:
            shared = SHARED_PREFIX_MIN_TOKENS if self.cascade and not windowed else 0
            plan = self._ops.plan(metadata.query_start_loc, metadata.seq_lens, metadata.block_tables, num_kv_heads,
                                  group, metadata.block_size, shared, SDPA_MIN_CHUNK if key[2] else 0)
            metadata.plans[key] = plan
        return plan

    def forward(self, q, k, v, kv_cache, metadata: CpuAttentionMetadata, scale, sliding_window=None, softcap=None):
        num_kv_heads = kv_cache.shape[2]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        # (SDPA would need an int8 cache's chunks dequantized first: the kernel reads them as they are.)
        sdpa = self.uses_sdpa(q.dtype) and bool(metadata.chunks) and not softcap and kv_cache.dtype != torch.int8
        window = int(sliding_window or 0)
        items, prefix_items = self.plan(metadata, num_kv_heads, q.shape[1] // num_kv_heads, sdpa, window > 0)
        out = self._ops.forward(q, k, v, kv_cache, metadata.slot_mapping, metadata.block_tables,
                                metadata.query_start_loc, metadata.seq_lens, items, prefix_items, scale,
                                window, float(softcap or 0.0))
        if sdpa:
            self._sdpa_chunks(q, kv_cache, metadata.chunks, scale, out, window)
        return out

    @staticmethod
    def _sdpa_chunks(q, kv_cache, chunks: list[_Chunk], scale: float, out: torch.Tensor, window: int = 0) -> None:
        head_dim = q.shape[-1]
        keys, values = key_view(kv_cache, head_dim), value_view(kv_cache, head_dim)
        num_kv_heads = keys.shape[1]
        for c in chunks:
            n = len(c.blocks) * keys.shape[-1]
            # [blocks, KVH, D, BS] -> [KVH, keys, D]; [blocks, KVH, BS, D] -> [KVH, keys, D]
            kc = keys[c.blocks].permute(1, 0, 3, 2).reshape(num_kv_heads, n, head_dim)[:, : c.seq_len]
            vc = values[c.blocks].transpose(0, 1).reshape(num_kv_heads, n, head_dim)[:, : c.seq_len]
            qc = q[c.t0:c.t1].transpose(0, 1)  # [H, L, D]
            length, cached = c.t1 - c.t0, c.seq_len - (c.t1 - c.t0)
            if cached == 0 and not window:
                o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
            else:  # query j sits at position cached + j
                keys_pos, q_pos = torch.arange(c.seq_len)[None, :], (cached + torch.arange(length))[:, None]
                mask = keys_pos <= q_pos
                if window:
                    mask &= keys_pos > q_pos - window
                o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
            out[c.t0:c.t1] = o.transpose(0, 1)
