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


def rope_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for any rope type transformers knows."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = config_head_dim(hf_config)
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once at load time."""

    def __init__(self, hf_config, max_positions: int, ops: ModuleType | None = None) -> None:
        super().__init__()
        inv_freq, scaling = rope_inv_freq(hf_config)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
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
        """x: [T, heads, D] rotated by its token's position: x * cos + rotate_half(x) * sin."""
        if self.ops is not None:
            self.ops.rotary_embedding(x, self.positions, self.cos, self.sin)
            return x
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + rotated * self.sin
