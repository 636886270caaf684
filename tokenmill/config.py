"""EngineConfig: every knob of the engine in one dataclass, validated once."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@dataclass
class EngineConfig:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None  # the KV cache size in blocks; overrides kv_cache_memory
    seed: int = 0
    log_steps: bool = False
    trace_path: str | None = None
    num_threads: int | None = None
    # Overlap: schedule step N+1 and process step N's outputs while N computes. None (auto): on only
    # where a core is left for it (num_threads below the CPUs this process may use).
    async_scheduling: bool | None = None
    attention_backend: str = "auto"  # "cpu" (C++ kernel), "torch" (reference), "auto": cpu where it builds
    # cpu backend, prompt chunks: "kernel", "sdpa" (torch's flash attention), "auto": sdpa for bf16 on AMX CPUs
    prefill_attention: str = "auto"
    # Scheduling and memory
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    sjf_aging_rate: float = 50.0  # sjf: tokens of job size forgiven per second of waiting
    preemption_mode: str = "recompute"
    swap_space: int = 1 << 30  # bytes of host memory for swapped-out blocks (preemption_mode="swap")
    enable_admission_control: bool = True
    initial_output_ratio: float = 1.0  # admission control: expected output / max_tokens before any finished
    output_ratio_decay: float = 0.9  # weight of the old estimate when a request finishes
    # Serving
    max_queued_requests: int | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.dtype == "float16":
            raise ValueError("dtype 'float16' is only supported on GPU; use 'float32' or 'bfloat16'")
        for name in ("block_size", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory", "num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.attention_backend not in ("auto", "cpu", "torch"):
            raise ValueError(f"attention_backend must be 'auto', 'cpu' or 'torch', got {self.attention_backend!r}")
        if self.prefill_attention not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"prefill_attention must be 'auto', 'kernel' or 'sdpa', got {self.prefill_attention!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if not isinstance(self.swap_space, int) or self.swap_space < 0:
            raise ValueError(f"swap_space must be a non-negative integer (bytes), got {self.swap_space!r}")
        if self.sjf_aging_rate < 0:
            raise ValueError(f"sjf_aging_rate must be non-negative, got {self.sjf_aging_rate!r}")
        if not 0.0 < self.initial_output_ratio <= 1.0:
            raise ValueError(f"initial_output_ratio must be in (0, 1], got {self.initial_output_ratio!r}")
        if not 0.0 <= self.output_ratio_decay < 1.0:
            raise ValueError(f"output_ratio_decay must be in [0, 1), got {self.output_ratio_decay!r}")
        if self.max_queued_requests is not None and (not isinstance(self.max_queued_requests, int)
                                                     or self.max_queued_requests < 1):
            raise ValueError(f"max_queued_requests must be a positive integer or None, got {self.max_queued_requests!r}")
        if (self.max_num_batched_tokens is not None and not self.enable_chunked_prefill
                and self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never run")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return _DTYPES[self.dtype]

    def finalize(self, model_max_len: int) -> None:
        """Fill the defaults that depend on the model; called once the model config is known."""
        if self.max_model_len is None:
            self.max_model_len = model_max_len
        elif self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's maximum "
                             f"context ({model_max_len})")
        if self.max_num_batched_tokens is None:
            # NOTE: 512, measured: on wl_main throughput is the same from 512 to 4096 on a 2-core CPU,
            # and a 512-token step (~0.75 s) holds up running decodes 4x less than a 2048 one.
            self.max_num_batched_tokens = 512 if self.enable_chunked_prefill else max(2048, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never run")
        cpus = len(os.sched_getaffinity(0))
        if self.num_threads is None:
            self.num_threads = cpus
        if self.async_scheduling is None:
            # With every core in the GEMMs, the engine's Python thread would steal cycles from them
            # rather than hide behind them (measured: wl_main 196 vs 204 output tok/s on 2 cores).
            self.async_scheduling = self.num_threads < cpus

    def kv_cache_bytes(self) -> int:
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        # NOTE: a tenth of the free RAM, capped at 4 GiB: room for tens of thousands of tokens of a
        # small model without squeezing the weights, the activations or the rest of the machine.
        return min(available_memory_bytes() // 10, 4 << 30)
