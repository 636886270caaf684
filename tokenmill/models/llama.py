"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5) over a flat ragged batch, and
the base class of the other families (tokenmill/models/<family>.py, listed in registry.py).

Module names follow Hugging Face's checkpoints, except that q/k/v and gate/up are each one
projection (one GEMM instead of three or two): `PACKED_MODULES` says which checkpoint weights are
stacked into which, and `pack_checkpoint` does it at load time. The forward pass never sees a
request: it gets token ids, positions, the KV caches and the attention metadata, and returns logits
only for the rows that sample.

`ops` is tokenmill's CPU extension (or None for plain PyTorch): with it, RMSNorm takes the residual
add along, SiLU x up is one pass, and RoPE rotates q and k in place; and where the layers are plain
Llama layers on the "cpu" attention backend, `decoder_stack` runs the whole loop over them in C++. The residual stream is carried
beside the hidden states from layer to layer (as vLLM does), so each add happens inside a norm.
Each layer's attention passes its own sliding window and soft-cap to the backend.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import head_dim
from tokenmill.models.layers.attention import AttentionBackend
from tokenmill.models.layers.decoder_stack import DecoderStack
from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding, StepRotary

# Our projection -> the checkpoint's weights stacked into it (along the output dimension), in order.
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def layer_type(cfg, layer_idx: int) -> str | None:
    """"sliding_attention" / "full_attention" where the config names each layer's kind, else None."""
    types = getattr(cfg, "layer_types", None)
    return types[layer_idx] if types else None


def layer_sliding_window(cfg, layer_idx: int) -> int | None:
    """The layer's attention window as transformers applies it: per layer type where the config has
    them (Gemma, Qwen2/3 with use_sliding_window), else the config's `sliding_window` (Mistral, Phi-3)."""
    window = getattr(cfg, "sliding_window", None)
    kind = layer_type(cfg, layer_idx)
    if kind is not None:
        return window if kind == "sliding_attention" else None
    return window or None


class Attention(nn.Module):
    """q/k/v in one projection, RoPE, paged attention, output projection. Families change the scale,
    the q/k norms (`norm_qk`), the rope set a layer uses (`rope_key`) and the soft-cap."""

    def __init__(self, cfg, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.scale = self.head_dim ** -0.5
        self.sliding_window = layer_sliding_window(cfg, layer_idx)
        self.softcap: float | None = None
        self.rope_key = "default"
        qkv_bias = _is_qwen2(cfg) or bool(getattr(cfg, "attention_bias", False))
        out_bias = bool(getattr(cfg, "attention_bias", False)) and not _is_qwen2(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=out_bias)
        self.backend = backend

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, H + 2 KVH, D] after the projection, before RoPE (families with q/k norms)."""
        return qkv

    def forward(self, x, ropes: dict[str, StepRotary], kv_cache, attn_metadata):
        t = x.shape[0]
        qkv = self.norm_qk(self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        # q and k heads are adjacent: rotate them in one go.
        qk = ropes[self.rope_key](qkv[:, : self.num_heads + self.num_kv_heads])
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """gate/up in one projection, act(gate) * up, down: SiLU (Llama) or tanh-GELU (Gemma's GeGLU)."""

    def __init__(self, cfg, ops: ModuleType | None, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.ops = ops
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.intermediate_size = intermediate_size or cfg.intermediate_size
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {act!r}; supported: silu, gelu_pytorch_tanh")
        self.act = act
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.act == "silu" and self.ops is not None and gate_up.device.type == "cpu":
            return self.down_proj(self.ops.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    """Pre-norm layer. The residual add happens inside the next norm (fused with it); Granite scales
    each branch's output by `residual_multiplier` before that add."""

    def __init__(self, cfg, layer_idx: int, model: "LlamaForCausalLM", backend: AttentionBackend,
                 ops: ModuleType | None) -> None:
        super().__init__()
        self.self_attn = model.attention_cls(cfg, layer_idx, backend)
        self.mlp = model.make_mlp(cfg, layer_idx, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.residual_multiplier = float(getattr(cfg, "residual_multiplier", 1.0))

    def forward(self, x, residual, ropes, kv_cache, attn_metadata):
        """x: the previous layer's MLP output (the embeddings for the first layer, residual None).
        Returns this layer's MLP output and the residual stream before it is added."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ropes, kv_cache, attn_metadata)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        return x, residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, model: "LlamaForCausalLM", backend: AttentionBackend, max_positions: int,
                 ops: ModuleType | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(model.layer_cls(cfg, i, model, backend, ops) for i in range(cfg.num_hidden_layers))
        self.norm = model.norm_cls(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = model.make_rotary(cfg, max_positions, ops)


class LlamaForCausalLM(nn.Module):
    """The Llama family, and the base the other families change a few parts of (one small class per
    family under tokenmill/models/: the layer, the norm, the attention, the MLP, the embedding and
    the logits)."""

    attention_cls: type[Attention] = Attention
    layer_cls: type[nn.Module] = DecoderLayer
    norm_cls: type[nn.Module] = RMSNorm
    # The layers as one C++ call, where they are plain Llama layers on the CPU kernels (set by the
    # loader once the weights are final; layers/decoder_stack.py). None: the Python loop.
    decoder_stack: DecoderStack | None = None

    def __init__(self, cfg, backend: AttentionBackend, max_positions: int, ops: ModuleType | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self, backend, max_positions, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, cfg, layer_idx: int, ops: ModuleType | None) -> nn.Module:
        return MLP(cfg, ops)

    @classmethod
    def make_rotary(cls, cfg, max_positions: int, ops: ModuleType | None) -> nn.ModuleDict:
        """The rotary tables by `Attention.rope_key` (one set; Gemma 3 has a local and a global one)."""
        return nn.ModuleDict({"default": RotaryEmbedding(cfg, max_positions, ops)})

    @classmethod
    def pack_checkpoint(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pack_checkpoint(state)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; returns logits [len(logits_indices), vocab] in the model's dtype
        (the sampler widens only the rows that need float32)."""
        m = self.model
        x = self.embed(input_ids)
        stack = self.decoder_stack
        if stack is not None and stack.takes(attn_metadata, x.dtype):
            x, residual = stack(x, positions, kv_caches, attn_metadata)  # the loop below, in C++
        else:
            # once per step, shared by the layers
            ropes = {name: rotary.for_positions(positions, x.dtype) for name, rotary in m.rotary.items()}
            residual = None
            for layer, kv_cache in zip(m.layers, kv_caches):
                x, residual = layer(x, residual, ropes, kv_cache, attn_metadata)
        # RMSNorm is per row: select the sampling rows first, so the last add, the norm and the LM
        # head skip the rest. (Layers that add their own residual return it None.)
        if residual is None:
            x = m.norm(x[logits_indices])
        else:
            x, _ = m.norm(x[logits_indices], residual[logits_indices])
        return self.logits(x)


def pack_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack a Hugging Face checkpoint's q/k/v and gate/up weights (and biases) into our fused ones
    (a checkpoint that has them fused already, as Phi-3's, is left as it is)."""
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
    return getattr(cfg, "model_type", "") in ("qwen2", "qwen2_moe")
