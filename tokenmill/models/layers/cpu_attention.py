"""CPU paged attention backend: a C++ kernel that reads K/V straight from the paged cache.

The torch backend gathers every request's keys and values through its block table into a padded
copy on every layer of every step; this one hands the cache, the block tables and the ragged batch
to `tokenmill/csrc/paged_attention.cpp`, which walks the block tables itself (all requests of the
step, decode tokens and prompt chunks alike, in one parallel call; see the comment at the top of
the .cpp for the work split and the vectorisation).

The extension is compiled on first use with torch.utils.cpp_extension (a C++17 compiler and ninja,
`-O3 -march=native -fopenmp`) into $TOKENMILL_CACHE/torch_extensions/<hash> (default
~/.cache/tokenmill/...). The hash covers the source, the torch version, the flags and the CPU, so
a later process imports the cached library directly without touching the compiler.
`cpu_attention_available()` says whether that worked (and logs why not, once), so the engine can
fall back to the torch backend.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from tokenmill.models.layers.attention import AttentionBackend, AttentionInputs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "paged_attention.cpp"
_NAME = "tokenmill_paged_attention"
# No -ffast-math: the kernel's float32 results must stay within rounding of SDPA's, and fast-math
# would also let the compiler assume no infinities (the masked scores are -inf).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]  # libgomp.so.1: resolves to the copy torch has already loaded
_OK_MARKER = "build-ok"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_directory() -> Path:
    """Where this source, torch version, flag set and CPU build (a new hash when any changes)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_CFLAGS + _LDFLAGS).encode(),
                 sys.version.encode(), platform.machine().encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    root = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
    return root / "torch_extensions" / f"{_NAME}-{h.hexdigest()[:16]}"


def _import_built(directory: Path) -> ModuleType | None:
    so = next(iter(sorted(directory.glob(f"{_NAME}*.so"))), None)
    if so is None or not (directory / _OK_MARKER).exists():
        return None
    spec = importlib.util.spec_from_file_location(so.stem.split(".")[0], so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension() -> ModuleType:
    """The compiled kernel module, building it on first use. Raises RuntimeError if it cannot."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            directory = build_directory()
            module = _import_built(directory)
            if module is None:
                from torch.utils.cpp_extension import load

                directory.mkdir(parents=True, exist_ok=True)
                module = load(name=_NAME, sources=[str(SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                              build_directory=str(directory), verbose=False)
                # Only a finished build is imported directly by later processes.
                tmp = directory / f"{_OK_MARKER}.{os.getpid()}"
                tmp.write_text(torch.__version__)
                tmp.replace(directory / _OK_MARKER)
        except Exception as e:  # compiler missing, build error, import error
            _error = f"cannot build the CPU paged-attention extension: {type(e).__name__}: {e}"
            raise RuntimeError(_error) from e
        _module = module
        return module


_warned = False


def cpu_attention_available() -> bool:
    """True if the C++ kernel builds (or is cached) and has its AVX2/FMA kernels; else warns once."""
    global _warned
    try:
        module = load_extension()
    except RuntimeError as e:
        reason = str(e)
    else:
        if module.has_simd():
            return True
        reason = ("the CPU paged-attention extension was compiled without AVX2/FMA; its scalar "
                  "fallback is slower than the torch backend")
    if not _warned:
        _warned = True
        logger.warning("%s; using the torch attention backend instead", reason)
    return False


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int64/int32 [R, max_blocks], contiguous
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    # Work items per (num_kv_heads, group): built by the first layer, reused by the others.
    plans: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


class CpuPagedAttention(AttentionBackend):
    """Paged attention by the C++ kernel: no gather, no padding, one parallel call per layer."""

    name = "cpu"

    def __init__(self) -> None:
        self._ops = load_extension()

    def prepare(self, inputs: AttentionInputs) -> CpuAttentionMetadata:
        return CpuAttentionMetadata(
            slot_mapping=inputs.slot_mapping.to(torch.int64).contiguous(),
            block_tables=inputs.block_tables.contiguous(),
            query_start_loc=torch.tensor(inputs.query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.int32),
        )

    def plan(self, metadata: CpuAttentionMetadata, num_kv_heads: int, group: int) -> torch.Tensor:
        key = (num_kv_heads, group)
        plan = metadata.plans.get(key)
        if plan is None:
            plan = metadata.plans[key] = self._ops.plan(metadata.query_start_loc, metadata.seq_lens,
                                                        num_kv_heads, group)
        return plan

    def forward(self, q, k, v, kv_cache, metadata: CpuAttentionMetadata, scale):
        num_kv_heads = kv_cache.shape[-2]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        plan = self.plan(metadata, num_kv_heads, q.shape[1] // num_kv_heads)
        return self._ops.forward(q, k, v, kv_cache, metadata.slot_mapping, metadata.block_tables,
                                 metadata.query_start_loc, metadata.seq_lens, plan, scale)
