"""Phi-3 / Phi-4-mini: the checkpoint already has q/k/v in one `qkv_proj` and gate/up in one
`gate_up_proj` (our layout: nothing to pack), `longrope` scaling and partial rotary
(`partial_rotary_factor`) come from the rope tables (layers/rotary.py), and `sliding_window`,
where set, applies to every layer."""
from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
