"""Rotary position embedding (rotate-half form, as Hugging Face's Llama), indexed by position.

`RotaryEmbedding.for_positions(positions, dtype)` is called once per step and gives the layers a
`StepRotary`: `rope(qk)` rotates a [T, heads, head_dim] view of the step's query and key heads.
With tokenmill's CPU kernels it rotates in place, reading the float32 tables by position; without,
it gathers the tables' rows once per step and returns a rotated copy.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tokenmill.config import head_dim as config_head_dim


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """The config's rope parameters (transformers' standardized `rope_parameters`), those of
    `layer_type` where the model keeps one set per layer type (Gemma 3: local and global bases)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return params


def rotary_dim(hf_config, layer_type: str | None = None) -> int:
    """How many leading dims of each head rotate (Phi-3's partial_rotary_factor; all of them else)."""
    factor = rope_parameters(hf_config, layer_type).get("partial_rotary_factor", 1.0)
    return int(config_head_dim(hf_config) * factor)


def rope_inv_freq(hf_config, layer_type: str | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for any rope type transformers knows, computed by
    transformers' own rope init functions (`seq_len`: the sequence length the dynamic and longrope
    types depend on)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = rotary_dim(hf_config, layer_type)
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_INIT_FUNCTIONS)}")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=seq_len, **kwargs)


# Rope types whose frequencies depend on the sequence length. transformers recomputes them on every
# forward from the batch's largest position: "dynamic" (NTK) for lengths past
# max_position_embeddings, "longrope" (its long factors) past original_max_position_embeddings. Here
# position p rotates with the frequencies of a sequence of p + 1 tokens, which is what transformers
# gives every decode token and every prompt that stays within the original context.
LENGTH_DEPENDENT = {"dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once at load time (for
    `layer_type`'s rope parameters where the model has one set per layer type). The tables are
    rotary_dim wide: with partial rotary only the first rotary_dim dims of each head rotate."""

    def __init__(self, hf_config, max_positions: int, ops: ModuleType | None = None,
                 layer_type: str | None = None) -> None:
        super().__init__()
        params = rope_parameters(hf_config, layer_type)
        positions = torch.arange(max_positions, dtype=torch.float)
        inv_freq, scaling = rope_inv_freq(hf_config, layer_type)
        freqs = positions[:, None] * inv_freq[None, :]
        scale = torch.full((max_positions, 1), float(scaling))
        length_key = LENGTH_DEPENDENT.get(params.get("rope_type"))
        if length_key is not None:
            original = int(params.get(length_key) or getattr(hf_config, length_key))
            # Past the original context: the frequencies of each length (longrope has one set for all).
            if params["rope_type"] == "longrope" and original < max_positions:
                inv, sc = rope_inv_freq(hf_config, layer_type, seq_len=original + 1)
                freqs[original:] = positions[original:, None] * inv[None, :]
                scale[original:] = sc
            for p in range(original, max_positions) if params["rope_type"] == "dynamic" else ():
                inv, sc = rope_inv_freq(hf_config, layer_type, seq_len=p + 1)
                freqs[p] = p * inv
                scale[p] = sc
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scale).contiguous(), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).contiguous(), persistent=False)
        self.rotary_dim = emb.shape[-1]
        self.ops = ops

    def for_positions(self, positions: torch.Tensor, dtype: torch.dtype) -> "StepRotary":
        if self.ops is not None and positions.device.type == "cpu":
            return StepRotary(positions=positions, cos=self.cos, sin=self.sin, ops=self.ops)
        return StepRotary(positions=positions, cos=self.cos[positions].to(dtype)[:, None, :],
                          sin=self.sin[positions].to(dtype)[:, None, :])


class StepRotary:
    """One step's rotation: positions [T]; cos/sin are the whole tables (ops) or the step's rows."""

    def __init__(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ops: ModuleType | None = None) -> None:
        self.positions, self.cos, self.sin, self.ops = positions, cos, sin, ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] rotated by its token's position: x * cos + rotate_half(x) * sin, over
        the first rotary_dim dims of each head (all of them unless the rotary is partial)."""
        rot = self.cos.shape[-1]
        if rot < x.shape[-1]:
            part = x[..., :rot]
            rotated = self(part)
            if rotated is not part:
                x = x.clone()
                x[..., :rot] = rotated
            return x
        if self.ops is not None:
            self.ops.rotary_embedding(x, self.positions, self.cos, self.sin)
            return x
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + rotated * self.sin
