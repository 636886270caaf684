"""tokenmill: a small LLM inference and serving engine with continuous batching over a paged KV cache.

The public names load on first use (PEP 562), so `python -m tokenmill.entrypoints.cli` starts
without importing torch: the command line re-executes itself with tcmalloc preloaded before any
heavy import (tokenmill/entrypoints/allocator.py).
"""
import importlib

_EXPORTS = {
    "LLM": "tokenmill.entrypoints.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "StructuredOutputsParams": "tokenmill.sampling_params",
    "RequestOutputKind": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
