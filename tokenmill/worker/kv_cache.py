"""The KV cache tensors: one tensor of attention.kv_cache_shape per layer (keys and values of every block)."""
from __future__ import annotations

import math
import mmap
import warnings

import torch

from tokenmill.config import head_dim
from tokenmill.models.layers.attention import kv_cache_shape


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers, for a cache of `dtype` (int8: an 8-bit cache, scales included)."""
    shape = kv_cache_shape(1, block_size, hf_config.num_key_value_heads, head_dim(hf_config), dtype == torch.int8)
    return hf_config.num_hidden_layers * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(hf_config, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero-filled caches in one anonymous memory map: the OS hands out zeroed pages as they are
    first written, so even a cache of gigabytes costs nothing at start-up (torch.zeros would touch
    every page: seconds). dtype int8: an 8-bit cache (attention.kv_cache_shape's quantized layout)."""
    shape = kv_cache_shape(num_blocks, block_size, hf_config.num_key_value_heads, head_dim(hf_config),
                           dtype == torch.int8)
    layers = hf_config.num_hidden_layers
    if num_blocks == 0:
        return [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
    nbytes = layers * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private, not mmap's default shared mapping: transparent huge pages apply to private anonymous
    # memory under THP's usual "madvise" setting, to shared memory only where shmem_enabled allows.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # decode attention reads the whole context: fewer TLB misses
    with warnings.catch_warnings():  # "non-writable buffer": an anonymous map is writable
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=dtype)
    return list(flat.view(layers, *shape).unbind(0))
