"""Linear layers with their weights prepacked once for oneDNN, as vLLM's CPU backend does.

nn.Linear hands the weight to the BLAS in its checkpoint layout on every call, and the BLAS
repacks it into its blocked layout each time: at decode batch sizes that copy is a large part of
the GEMM (the weights stream from memory every step anyway), so prepacking pays most at small
batches (the README has the measured figures).
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's blocked layout (an opaque tensor: no state dict)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear; returns how many (0 without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    for module in model.modules():  # weights that are not nn.Linears (the MoE experts) pack themselves
        if hasattr(module, "prepack_weights"):
            module.prepack_weights()
    return len(targets)
