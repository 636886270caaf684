"""CPU paged attention backend: a C++ kernel that reads K/V straight from the paged cache.

The torch backend gathers every request's keys and values through its block table into a padded
copy on every layer of every step; this one hands the cache, the block tables and the ragged batch
to `tokenmill/csrc/paged_attention.cpp`, which walks the block tables itself (all requests of the
step, decode tokens and prompt chunks alike, in one parallel call; see the comment at the top of
the .cpp for the work split and the vectorisation). The kernel is part of tokenmill's CPU
extension (see cpu_ops.py for how it is built).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.models.layers.attention import AttentionBackend, AttentionInputs
from tokenmill.models.layers.cpu_ops import load_extension


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int64/int32 [R, max_blocks], contiguous
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    # Work items per (num_kv_heads, group): built by the first layer, reused by the others.
    plans: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


class CpuPagedAttention(AttentionBackend):
    """Paged attention by the C++ kernel: no gather, no padding, one parallel call per layer."""

    name = "cpu"

    def __init__(self) -> None:
        self._ops = load_extension()

    def prepare(self, inputs: AttentionInputs) -> CpuAttentionMetadata:
        return CpuAttentionMetadata(
            slot_mapping=inputs.slot_mapping.to(torch.int64).contiguous(),
            block_tables=inputs.block_tables.contiguous(),
            query_start_loc=torch.tensor(inputs.query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.int32),
        )

    def plan(self, metadata: CpuAttentionMetadata, num_kv_heads: int, group: int) -> torch.Tensor:
        key = (num_kv_heads, group)
        plan = metadata.plans.get(key)
        if plan is None:
            plan = metadata.plans[key] = self._ops.plan(metadata.query_start_loc, metadata.seq_lens,
                                                        num_kv_heads, group)
        return plan

    def forward(self, q, k, v, kv_cache, metadata: CpuAttentionMetadata, scale):
        num_kv_heads = kv_cache.shape[-2]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        plan = self.plan(metadata, num_kv_heads, q.shape[1] // num_kv_heads)
        return self._ops.forward(q, k, v, kv_cache, metadata.slot_mapping, metadata.block_tables,
                                 metadata.query_start_loc, metadata.seq_lens, plan, scale)
