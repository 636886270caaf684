"""Sparse mixture-of-experts: Mixtral, Qwen2-MoE, Qwen3-MoE.

The router is a linear layer over the experts; the softmax runs in float32, each token keeps its
top-k experts (renormalised where the model does: Mixtral always, the Qwen MoEs with
`norm_topk_prob`). The experts run as grouped GEMMs: the (token, expert) pairs are sorted by
expert, and each expert that got any tokens takes all of them in one gate/up GEMM and one down
GEMM, weighted by the router and added back with index_add (a loop over the experts, never over
tokens). Qwen2-MoE adds a shared expert (a dense MLP every token goes through) scaled by
sigmoid(shared_expert_gate(x)). Qwen MoE layers in `mlp_only_layers` or off the
`decoder_sparse_step` are dense MLPs.

Checkpoints store each expert apart (`experts.<e>.gate_proj` / `up_proj` / `down_proj`, Mixtral's
`block_sparse_moe.experts.<e>.w1` / `w3` / `w2`); they are stacked at load time into
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I] (transformers' own fused
layout, which a checkpoint may also hold as it is).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.llama import MLP, LlamaForCausalLM, pack_checkpoint
from tokenmill.models.qwen3 import HeadNormAttention


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def prepack_weights(self) -> None:
        """Each expert's two weights in oneDNN's blocked layout, as PackedLinear does for nn.Linear
        (called by prepack_linears): the BLAS does not repack them on every call."""
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self._packed = [(reorder(self.gate_up_proj[e].detach(), None), reorder(self.down_proj[e].detach(), None))
                        for e in range(self.gate_up_proj.shape[0])]

    def _linear(self, x: torch.Tensor, e: int, which: int) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed[e][which], None, "none", [], "")
        return F.linear(x, (self.gate_up_proj, self.down_proj)[which][e])

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; experts, weights [T, k]: each token's experts and their router weights."""
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = tokens[start:start + n]
            gate, up = self._linear(x[idx], e, 0).split(self.intermediate_size, dim=-1)
            h = self._linear(F.silu(gate) * up, e, 1)
            out.index_add_(0, idx, h * pair_weights[start:start + n, None])
            start += n
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, ops) -> None:
        super().__init__()
        self.num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        # Mixtral always renormalises its top-k weights; the Qwen MoEs where norm_topk_prob says so.
        self.norm_topk_prob = getattr(cfg, "norm_topk_prob", True)
        intermediate = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        self.gate = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)
        self.experts = Experts(self.num_experts, cfg.hidden_size, intermediate)
        shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        if shared:
            self.shared_expert = MLP(cfg, ops, intermediate_size=shared)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights (float32), as transformers' routers."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(x)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


_EXPERT = re.compile(r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint weights -> experts.gate_up_proj [E, 2I, H] and experts.down_proj
    [E, H, I]; Mixtral's block_sparse_moe becomes mlp."""
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        m = _EXPERT.match(name)
        if m:
            prefix, e, part = m.group(1), int(m.group(2)), _PART.get(m.group(3), m.group(3))
            per_layer.setdefault(prefix, {}).setdefault(e, {})[part] = tensor
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for prefix, experts in per_layer.items():
        ids = sorted(experts)
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg, layer_idx: int, ops) -> nn.Module:
        if layer_idx in (getattr(cfg, "mlp_only_layers", None) or []) or \
                (layer_idx + 1) % (getattr(cfg, "decoder_sparse_step", 1) or 1) != 0:
            return MLP(cfg, ops)
        return SparseMoeBlock(cfg, ops)

    @classmethod
    def pack_checkpoint(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pack_checkpoint(stack_experts(state))


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    pass


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    attention_cls = HeadNormAttention
