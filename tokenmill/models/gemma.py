"""Gemma 2 and Gemma 3 (text): RMSNorm with (1 + weight) in float32, embeddings scaled by
sqrt(hidden) (rounded to the model's dtype, as transformers does), GeGLU (tanh GELU), norms before
and after both the attention and the MLP, attention scale query_pre_attn_scalar ** -0.5,
sliding-window layers interleaved with global ones (`layer_types`). Gemma 2: attention logit
soft-capping and final logit soft-capping. Gemma 3: q/k norms per head, and a second rope base for
the local (sliding) layers."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import Attention, LlamaForCausalLM, layer_type
from tokenmill.models.qwen3 import HeadNormAttention


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, rounded to the input dtype once at the end."""

    def __init__(self, hidden_size: int, eps: float, ops=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma2Attention(Attention):
    def __init__(self, cfg, layer_idx: int, backend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None) or None


class Gemma3Attention(HeadNormAttention):
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg, layer_idx: int, backend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None) or None
        self.rope_key = layer_type(cfg, layer_idx) or "full_attention"


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, model, backend, ops) -> None:
        super().__init__()
        self.self_attn = model.attention_cls(cfg, layer_idx, backend)
        self.mlp = model.make_mlp(cfg, layer_idx, ops)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, residual, ropes, kv_cache, attn_metadata):
        """x: the hidden states (each layer adds its own residual; residual stays None)."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ropes, kv_cache, attn_metadata))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), None


class Gemma2ForCausalLM(LlamaForCausalLM):
    attention_cls = Gemma2Attention
    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    attention_cls = Gemma3Attention

    @classmethod
    def make_rotary(cls, cfg, max_positions: int, ops) -> nn.ModuleDict:
        """One table per layer type: the global base for full layers, the local one for sliding."""
        kinds = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        return nn.ModuleDict({k: RotaryEmbedding(cfg, max_positions, ops, layer_type=k) for k in kinds})
