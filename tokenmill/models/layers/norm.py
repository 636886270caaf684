"""RMSNorm, computed in float32 like Hugging Face's Llama, optionally fused with the residual add.

`norm(x)` normalises; `norm(x, residual)` first adds x into the residual stream and normalises the
sum, returning (normalised, new residual). With tokenmill's CPU kernels (`ops`) both are one pass
over memory, and the second one works in place: it overwrites x and residual, so callers hand it
tensors they own and use only what it returns.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: ModuleType | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.ops is not None and x.device.type == "cpu":
            if residual is None:
                return self.ops.rms_norm(x, self.weight, self.eps)
            self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
