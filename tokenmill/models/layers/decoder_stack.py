"""The decoder layers of a Llama-shaped model in one C++ call (tokenmill/csrc/decoder_stack.cpp).

The Python loop over the layers (llama.py) calls ~9 kernels a layer. Between two of them the
interpreter runs module calls, views and argument parsing with the caches cold from the GEMM
before (its weights stream through them): on SmolLM2-135M at 128 decodes those gaps cost ~10 ms a
step, against ~1.3 ms with the kernels stubbed out. `DecoderStack` runs the same kernels in the
same order from C++, so its outputs are the Python loop's, bit for bit, and only the step's
setup (the attention plan, the argument lists) stays in Python.

It takes a model whose layers compute exactly what llama.py's DecoderLayer, Attention, MLP (SiLU)
and RMSNorm compute, with tokenmill's CPU extension and the "cpu" attention backend: Llama,
SmolLM2, Mistral, Qwen2, Phi-3 (partial rotary, one window for all layers). Families that change
a layer (q/k norms, soft-capping, branch multipliers, other activations, MoE, per-layer windows)
keep the Python loop, as does a step whose prompt chunks go to SDPA (AMX CPUs, bfloat16).
"""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers.cpu_attention import CpuAttentionMetadata, CpuPagedAttention
from tokenmill.models.layers.linear import PackedLinear
from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding


class DecoderStack:
    """A model's decoder layers as one call: `(x, residual) = stack(x, positions, kv_caches, metadata)`.

    `timings`, when set to a float64 tensor of len(PARTS) zeros, accumulates each part's seconds
    over the calls (`tokenmill bench profile` reads it); None (the default) times nothing."""

    PARTS = ("RMSNorm (+ residual)", "projections", "RoPE", "paged attention", "silu_and_mul")

    def __init__(self, stack, backend: CpuPagedAttention, rotary: RotaryEmbedding, num_kv_heads: int, group: int,
                 window: int, gemm_flops_per_token: int) -> None:
        self._stack, self._backend, self._rotary = stack, backend, rotary
        self._num_kv_heads, self._group, self._window = num_kv_heads, group, window
        self.gemm_flops_per_token = gemm_flops_per_token
        self.timings: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module) -> "DecoderStack | None":
        """The stack for `model` (a LlamaForCausalLM after its linears are prepacked), or None where
        one of its layers computes something else (see the module docstring)."""
        from tokenmill.models.llama import MLP, Attention, DecoderLayer

        def plain(module, base) -> bool:  # computes what `base` computes (a subclass may only set fields)
            return isinstance(module, base) and all(getattr(type(module), name) is getattr(base, name)
                                                    for name in ("forward", "norm_qk") if hasattr(base, name))

        layers = list(model.model.layers)
        rotary = model.model.rotary
        if (not layers or not plain(layers[0], DecoderLayer) or set(rotary.keys()) != {"default"}
                or type(rotary["default"]) is not RotaryEmbedding):
            return None
        first = layers[0]
        ops, backend = first.input_layernorm.ops, first.self_attn.backend
        if ops is None or not hasattr(ops, "DecoderStack") or not isinstance(backend, CpuPagedAttention):
            return None

        def linear(module) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
            if isinstance(module, PackedLinear):
                return module.packed_weight, module.bias, True
            if type(module) is nn.Linear:
                return module.weight.detach(), None if module.bias is None else module.bias.detach(), False
            return None

        attn0 = first.self_attn
        stack = ops.DecoderStack(attn0.num_heads, attn0.num_kv_heads, attn0.head_dim, rotary["default"].rotary_dim,
                                 first.input_layernorm.eps, attn0.scale, int(attn0.sliding_window or 0))
        flops = 0
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if not (plain(layer, DecoderLayer) and plain(attn, Attention) and plain(mlp, MLP) and mlp.act == "silu"
                    and layer.residual_multiplier == 1.0 and attn.softcap is None and attn.rope_key == "default"
                    and all(plain(n, RMSNorm) and n.eps == first.input_layernorm.eps for n in norms)
                    and (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, attn.sliding_window)
                    == (attn0.num_heads, attn0.num_kv_heads, attn0.head_dim, attn0.scale, attn0.sliding_window)
                    and attn.backend is backend and mlp.ops is ops):
                return None
            linears = [linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(lin is None for lin in linears):
                return None
            stack.add_layer(norms[0].weight.detach(), norms[1].weight.detach(), linears)
            flops += sum(2 * m.in_features * m.out_features
                         for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        return cls(stack, backend, rotary["default"], attn0.num_kv_heads, attn0.num_heads // attn0.num_kv_heads,
                   int(attn0.sliding_window or 0), flops)

    def takes(self, metadata, dtype: torch.dtype) -> bool:
        """Whether this step runs here: the kernel attends every row (no chunk goes to SDPA)."""
        return (isinstance(metadata, CpuAttentionMetadata)
                and not (metadata.chunks and self._backend.uses_sdpa(dtype)))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: CpuAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        items, prefix_items = self._backend.plan(metadata, self._num_kv_heads, self._group, False, self._window > 0)
        return self._stack.forward(x, positions, self._rotary.cos, self._rotary.sin, kv_caches,
                                   metadata.slot_mapping, metadata.block_tables, metadata.query_start_loc,
                                   metadata.seq_lens, items, prefix_items, self.timings)
