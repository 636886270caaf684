"""tokenmill's CPU kernels: one C++ extension built from `tokenmill/csrc` on first use.

    paged_attention.cpp   paged attention over a ragged batch (the "cpu" attention backend)
    fused_ops.cpp         RMSNorm (with the residual add), SiLU x up, rotary embedding
    decoder_stack.cpp     the Llama decoder layers of a forward pass in one call
    argmax.cpp            argmax of each logits row in its own dtype (greedy sampling)
    bindings.cpp          the Python module

The extension is compiled on first use with torch.utils.cpp_extension (a C++17 compiler and ninja,
`-O3 -march=native -fopenmp`) into $TOKENMILL_CACHE/torch_extensions/<hash> (default
~/.cache/tokenmill/...). The hash covers the sources, the torch version, the flags and the CPU, so
a later process imports the cached library directly without touching the compiler.
The kernels are written on one vector type as wide as the CPU they are built for (csrc/cpu_vec.h:
16 float32 lanes with AVX-512, 8 with AVX2); `vector_lanes()` says which. `cpu_ops_available()`
says whether the build worked (and logs why not, once), so the engine can fall back to plain
PyTorch.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("paged_attention.cpp", "fused_ops.cpp", "decoder_stack.cpp", "argmax.cpp", "bindings.cpp")
_NAME = "tokenmill_cpu_ops"
# No -ffast-math: the kernels' float32 results must stay within rounding of the torch ops they
# replace, and fast-math would also let the compiler assume no infinities (masked scores are -inf).
# (fused_ops.cpp turns FMA contraction off for itself; the attention kernel keeps it.)
# -mprefer-vector-width=512: GCC's tuning for CPUs it does not know by name (Zen 4 under GCC 12)
# splits 512-bit conversions into 256-bit halves and re-inserts them (bf16 -> float took 5
# instructions instead of 1); on an AVX2-only CPU the flag changes nothing.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]  # libgomp.so.1: resolves to the copy torch has already loaded
_OK_MARKER = "build-ok"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature flags line (/proc/cpuinfo), for the build hash and the feature checks (read
    once: the attention backend asks on every layer)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has AMX's bfloat16 tile units (torch's flash-attention and GEMMs use them)."""
    return "amx_bf16" in cpu_flags().split()


def build_directory() -> Path:
    """Where these sources, this torch version, flag set and CPU build (a new hash when any changes)."""
    h = hashlib.sha256()
    files = sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.h"))
    for part in (*(f.read_bytes() for f in files), torch.__version__.encode(), " ".join(_CFLAGS + _LDFLAGS).encode(),
                 sys.version.encode(), platform.machine().encode(), cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    from tokenmill.models.loader import cache_dir

    return cache_dir() / "torch_extensions" / f"{_NAME}-{h.hexdigest()[:16]}"


def _import_built(directory: Path) -> ModuleType | None:
    so = next(iter(sorted(directory.glob(f"{_NAME}*.so"))), None)
    if so is None or not (directory / _OK_MARKER).exists():
        return None
    spec = importlib.util.spec_from_file_location(so.stem.split(".")[0], so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension() -> ModuleType:
    """The compiled extension module, building it on first use. Raises RuntimeError if it cannot."""
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
                module = load(name=_NAME, sources=[str(SOURCE_DIR / s) for s in SOURCES], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                              build_directory=str(directory), verbose=False)
                # Only a finished build is imported directly by later processes.
                tmp = directory / f"{_OK_MARKER}.{os.getpid()}"
                tmp.write_text(torch.__version__)
                tmp.replace(directory / _OK_MARKER)
        except Exception as e:  # compiler missing, build error, import error
            _error = f"cannot build tokenmill's CPU extension: {type(e).__name__}: {e}"
            raise RuntimeError(_error) from e
        _module = module
        return module


_warned = False


def cpu_ops_available() -> bool:
    """True if the extension builds (or is cached); else warns once."""
    global _warned
    try:
        load_extension()
        return True
    except RuntimeError as e:
        reason = str(e)
    if not _warned:
        _warned = True
        logger.warning("%s; using plain PyTorch instead", reason)
    return False
