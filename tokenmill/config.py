"""EngineConfig: every knob of the engine in one dataclass (name, type, default, help), validated once."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "int8")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    from tokenmill.models.layers.cpu_ops import cpu_flags  # the one reader of /proc/cpuinfo

    return bool(set(cpu_flags().split()) & {"amx_bf16", "avx512_bf16"})


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def head_dim(hf_config) -> int:
    """The attention head size: the model config's head_dim where it has one, else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _knob(default, help: str, *, flag: str | None = None, choices: tuple | None = None,
          metavar: str | None = None):
    """A field with what the command line shows for it (tokenmill's CLI builds its engine flags from
    these: --name-with-dashes, or `flag`; a True bool becomes --no-...)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine, validated on construction. `finalize(model_max_len)` returns the
    resolved copy the engine runs with (the defaults that depend on the model and the machine filled
    in); a config never changes once made, so any thread may read it."""
    model: str | None = _knob(None, "Hugging Face folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    tokenizer: str | None = _knob(None, "tokenizer folder (default: the model's)")
    dtype: str = _knob("auto", "'auto': bfloat16 where the CPU has AMX or AVX512-BF16, else float32",
                       choices=("auto", "float32", "bfloat16"))
    kv_cache_dtype: str = _knob(
        "auto", "KV cache elements: the model's dtype (auto), or int8 with a float32 scale per token and head "
                "(opt-in: half of bfloat16's bytes, so faster decode attention, at a small accuracy cost)",
        choices=KV_CACHE_DTYPES)
    max_model_len: int | None = _knob(None, "longest sequence, prompt + output (default: the model's context)")
    block_size: int = _knob(16, "tokens per KV cache block")
    max_num_seqs: int = _knob(256, "most requests in one step")
    max_num_batched_tokens: int | None = _knob(
        None, "token budget of a step (default: 512 with chunked prefill, else max(2048, max_model_len))")
    enable_chunked_prefill: bool = _knob(True, "do not split long prompts across steps", flag="--no-chunked-prefill")
    kv_cache_memory: int | None = _knob(None, "KV cache size in bytes (default: a tenth of free RAM, at most 4 GiB)")
    num_kv_blocks: int | None = _knob(None, "KV cache size in blocks (overrides --kv-cache-memory)")
    seed: int = _knob(0, "seed of the sampler for requests without their own")
    log_steps: bool = _knob(False, "print one line per engine step to stderr")
    trace_path: str | None = _knob(None, "write one JSON line per engine step to PATH (see `tokenmill trace`)",
                                   flag="--trace", metavar="PATH")
    num_threads: int | None = _knob(None, "torch threads (default: the CPUs this process may use)")
    async_scheduling: bool | None = _knob(
        None, "overlap scheduling and output processing with the forward pass (default: on only where "
              "--num-threads leaves a CPU free)")
    attention_backend: str = _knob(
        "auto", "paged attention: the C++ kernel (cpu), plain PyTorch (torch), or cpu where it builds (auto)",
        choices=("auto", "cpu", "torch"))
    prefill_attention: str = _knob(
        "auto", "cpu backend, prompt chunks: the C++ kernel, torch's SDPA (flash attention), or sdpa for "
                "bfloat16 on AMX CPUs (auto)", choices=("auto", "kernel", "sdpa"))
    cascade_attention: bool = _knob(
        True, "cpu backend: attend each request's keys itself even where a group of requests shares a "
              "prompt prefix (by default the shared blocks are attended once for the group)",
        flag="--no-cascade-attention")
    # Scheduling and memory
    enable_prefix_caching: bool = _knob(True, "do not reuse the KV blocks of cached prompt prefixes",
                                        flag="--no-prefix-caching")
    scheduling_policy: str = _knob("fcfs", "fcfs | priority | sjf | fair")
    sjf_aging_rate: float = _knob(50.0, "sjf: tokens of job size forgiven per second of waiting")
    preemption_mode: str = _knob("recompute", "what preemption does with a victim's KV: drop it (recompute) "
                                 "or copy it to host memory (swap)", choices=("recompute", "swap"))
    swap_space: int = _knob(1 << 30, "bytes of host memory for swapped-out blocks (--preemption-mode swap)")
    enable_admission_control: bool = _knob(True, "admit requests even when their expected peak of KV blocks "
                                           "does not fit", flag="--no-admission-control")
    initial_output_ratio: float = _knob(1.0, "admission control: expected output / max_tokens before any "
                                        "request finished")
    output_ratio_decay: float = _knob(0.9, "admission control: weight of the old expected output ratio when a "
                                      "request finishes")
    # Structured outputs
    grammar_compile_timeout: float = _knob(
        10.0, "structured outputs: seconds a constraint (JSON schema, regex, grammar) may take to compile "
              "before the request is refused")
    grammar_cache_size: int = _knob(128, "structured outputs: compiled grammars kept (least recently used dropped)")
    # Serving
    max_queued_requests: int | None = _knob(None, "serve: answer 503 while this many requests wait to be scheduled")
    # Prefill/decode disaggregation (vLLM's kv_transfer_params; see tokenmill/distributed/kv_transfer)
    kv_role: str | None = _knob(None, "take part in KV transfer: producer (a prefill instance: keeps a prompt's "
                                "KV for a decode instance), consumer (a decode instance: pulls it), or both",
                                choices=("producer", "consumer", "both"))
    kv_host: str = _knob("127.0.0.1", "producer: the address its KV port binds and that it tells consumers")
    kv_port: int | None = _knob(None, "producer: the TCP port consumers pull KV blocks from (default: a free one)")
    kv_lease_timeout: float = _knob(30.0, "producer: seconds a finished prompt's blocks wait for their consumer "
                                    "before they are freed")
    kv_load_timeout: float = _knob(10.0, "consumer: seconds a KV pull may take before it is given up")
    kv_load_failure_policy: str = _knob("recompute", "consumer: when a KV pull fails, compute the prompt here "
                                        "(recompute) or fail the request (fail)", choices=("recompute", "fail"))

    def __post_init__(self) -> None:
        if self.kv_role not in (None, "producer", "consumer", "both"):
            raise ValueError(f"kv_role must be 'producer', 'consumer', 'both' or None, got {self.kv_role!r}")
        if self.kv_port is not None and (not isinstance(self.kv_port, int) or not 0 <= self.kv_port < 65536):
            raise ValueError(f"kv_port must be a TCP port (0-65535) or None, got {self.kv_port!r}")
        for name in ("kv_lease_timeout", "kv_load_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (seconds), got {getattr(self, name)!r}")
        if self.kv_load_failure_policy not in ("recompute", "fail"):
            raise ValueError(f"kv_load_failure_policy must be 'recompute' or 'fail', got "
                             f"{self.kv_load_failure_policy!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.dtype == "float16":
            raise ValueError("dtype 'float16' is only supported on GPU; use 'float32' or 'bfloat16'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
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
        if not self.grammar_compile_timeout > 0:
            raise ValueError(f"grammar_compile_timeout must be positive, got {self.grammar_compile_timeout!r}")
        if not isinstance(self.grammar_cache_size, int) or self.grammar_cache_size < 1:
            raise ValueError(f"grammar_cache_size must be a positive integer, got {self.grammar_cache_size!r}")
        if self.max_queued_requests is not None and (not isinstance(self.max_queued_requests, int)
                                                     or self.max_queued_requests < 1):
            raise ValueError(f"max_queued_requests must be a positive integer or None, got {self.max_queued_requests!r}")

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

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The KV cache tensors' dtype: the model's, or int8 (see attention.kv_cache_shape)."""
        return torch.int8 if self.kv_cache_dtype == "int8" else self.torch_dtype

    def finalize(self, model_max_len: int) -> "EngineConfig":
        """This config with the defaults that depend on the model (its context length) and the machine
        filled in, checked together; a resolved config finalizes to itself."""
        max_model_len = self.max_model_len
        if max_model_len is None:
            max_model_len = model_max_len
        elif max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's maximum "
                             f"context ({model_max_len})")
        budget = self.max_num_batched_tokens
        if budget is None:
            # NOTE: 512 with chunked prefill: throughput is the same from 512 to 4096 on the CPUs
            # measured (README, "Speed on CPU"), and a small step holds up running decodes less.
            budget = 512 if self.enable_chunked_prefill else max(2048, max_model_len)
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) is smaller than max_model_len "
                f"({max_model_len}) with chunked prefill disabled: long prompts could never run")
        cpus = len(os.sched_getaffinity(0))
        num_threads = cpus if self.num_threads is None else self.num_threads
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            # With every core in the GEMMs, the engine's Python thread steals cycles from them rather
            # than hiding behind them (measured: README, "Speed on CPU").
            async_scheduling = num_threads < cpus
        return replace(self, max_model_len=max_model_len, max_num_batched_tokens=budget,
                       num_threads=num_threads, async_scheduling=async_scheduling)

    def kv_cache_bytes(self) -> int:
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        # NOTE: a tenth of the free RAM, capped at 4 GiB: room for tens of thousands of tokens of a
        # small model without squeezing the weights, the activations or the rest of the machine.
        return min(available_memory_bytes() // 10, 4 << 30)
