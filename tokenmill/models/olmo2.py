"""OLMo 2: norms after the attention and the MLP, not before (h = x + norm(attn(x)); out = h +
norm(mlp(h))), and q/k RMSNorms over the whole projection (all heads at once), before RoPE."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.llama import Attention, LlamaForCausalLM


class Olmo2Attention(Attention):
    def __init__(self, cfg, layer_idx: int, backend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        t, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        qkv[:, :h] = self.q_norm(qkv[:, :h].reshape(t, self.q_size)).view(t, h, self.head_dim)
        qkv[:, h:h + kvh] = self.k_norm(qkv[:, h:h + kvh].reshape(t, self.kv_size)).view(t, kvh, self.head_dim)
        return qkv


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, model, backend, ops) -> None:
        super().__init__()
        self.self_attn = model.attention_cls(cfg, layer_idx, backend)
        self.mlp = model.make_mlp(cfg, layer_idx, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, x, residual, ropes, kv_cache, attn_metadata):
        """x: the hidden states (each layer adds its own residual; residual stays None)."""
        x = x + self.post_attention_layernorm(self.self_attn(x, ropes, kv_cache, attn_metadata))
        return x + self.post_feedforward_layernorm(self.mlp(x)), None


class Olmo2ForCausalLM(LlamaForCausalLM):
    attention_cls = Olmo2Attention
    layer_cls = Olmo2DecoderLayer
