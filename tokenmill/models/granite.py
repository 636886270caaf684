"""Granite: Llama with four multipliers: the embeddings (`embedding_multiplier`), each branch's
output before its residual add (`residual_multiplier`, in DecoderLayer), the attention scale
(`attention_multiplier`, instead of head_dim ** -0.5) and the logits (divided by `logits_scaling`)."""
from __future__ import annotations

import torch

from tokenmill.models.llama import Attention, LlamaForCausalLM


class GraniteAttention(Attention):
    def __init__(self, cfg, layer_idx: int, backend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.scale = float(cfg.attention_multiplier)


class GraniteForCausalLM(LlamaForCausalLM):
    attention_cls = GraniteAttention

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x) / self.config.logits_scaling
