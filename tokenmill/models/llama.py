"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5) over a flat ragged batch.

Module names follow Hugging Face's checkpoints, except that q/k/v and gate/up are each one
projection (one GEMM instead of three or two): `PACKED_MODULES` says which checkpoint weights are
stacked into which, and `pack_checkpoint` does it at load time. The forward pass never sees a
request: it gets token ids, positions, the KV caches and the attention metadata, and returns logits
only for the rows that sample.

`ops` is tokenmill's CPU extension (or None for plain PyTorch): with it, RMSNorm takes the residual
add along, SiLU x up is one pass, and RoPE rotates q and k in place. The residual stream is carried
beside the hidden states from layer to layer (as vLLM does), so each add happens inside a norm.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import head_dim
from tokenmill.models.layers.attention import AttentionBackend
from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding, StepRotary

# Our projection -> the checkpoint's weights stacked into it (along the output dimension), in order.
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Attention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.scale = self.head_dim ** -0.5
        out_bias = bool(getattr(cfg, "attention_bias", False)) and not _is_qwen2(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=out_bias)
        self.backend = backend

    def forward(self, x, rope: StepRotary, kv_cache, attn_metadata):
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads are adjacent: rotate them in one go.
        qk = rope(qkv[:, : self.num_heads + self.num_kv_heads])
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg, ops: ModuleType | None) -> None:
        super().__init__()
        self.ops = ops
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.ops is not None and gate_up.device.type == "cpu":
            return self.down_proj(self.ops.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, backend: AttentionBackend, ops: ModuleType | None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, qkv_bias, backend)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, x, residual, rope: StepRotary, kv_cache, attn_metadata):
        """x: the previous layer's MLP output (the embeddings for the first layer, residual None).
        Returns this layer's MLP output and the residual stream before it is added."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, backend: AttentionBackend, max_positions: int,
                 ops: ModuleType | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, backend, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = RotaryEmbedding(cfg, max_positions, ops)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, backend: AttentionBackend, max_positions: int, ops: ModuleType | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, qkv_bias=_is_qwen2(cfg) or bool(getattr(cfg, "attention_bias", False)),
                                backend=backend, max_positions=max_positions, ops=ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def pack_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pack_checkpoint(state)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; returns logits [len(logits_indices), vocab] in the model's dtype
        (the sampler widens only the rows that need float32)."""
        m = self.model
        x = m.embed_tokens(input_ids)
        rope = m.rotary.for_positions(positions, x.dtype)  # once per step, shared by the layers
        residual = None
        for layer, kv_cache in zip(m.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, attn_metadata)
        # RMSNorm is per row: select the sampling rows first, so the last add, the norm and the LM
        # head skip the rest.
        x, _ = m.norm(x[logits_indices], residual[logits_indices])
        return self.lm_head(x)


def pack_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack a Hugging Face checkpoint's q/k/v and gate/up weights (and biases) into our fused ones."""
    out = dict(state)
    for name in state:
        for packed, parts in PACKED_MODULES.items():
            prefix, _, suffix = name.rpartition(f".{parts[0]}.")
            if not prefix:
                continue
            names = [f"{prefix}.{p}.{suffix}" for p in parts]
            out[f"{prefix}.{packed}.{suffix}"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def _is_qwen2(cfg) -> bool:
    return getattr(cfg, "model_type", "") == "qwen2"


# Architecture name (config.json "architectures") -> model class.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
