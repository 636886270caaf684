"""The KV cache tensors: one [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer."""
from __future__ import annotations

import torch


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(hf_config, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    shape = (2, num_blocks, block_size, hf_config.num_key_value_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(hf_config.num_hidden_layers)]
