"""Qwen3: Llama with an RMSNorm over each query and key head before RoPE (`q_norm`, `k_norm`), no
qkv bias and an explicit `head_dim` (often != hidden / heads)."""
from __future__ import annotations

import torch

from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.llama import Attention, LlamaForCausalLM


class HeadNormAttention(Attention):
    """q_norm / k_norm: one RMSNorm over head_dim, shared by the heads, on the projected q and k."""

    norm_cls = RMSNorm

    def __init__(self, cfg, layer_idx: int, backend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.q_norm = self.norm_cls(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = self.norm_cls(self.head_dim, cfg.rms_norm_eps)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        qkv[:, :h] = self.q_norm(qkv[:, :h])
        qkv[:, h:h + kvh] = self.k_norm(qkv[:, h:h + kvh])
        return qkv


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = HeadNormAttention
