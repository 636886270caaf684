"""tcmalloc under the `tokenmill` command, as vLLM's CPU deployments run it.

Every oneDNN projection allocates its output, its execution context and a handful of small
objects, from the main thread and the OpenMP workers; glibc's malloc serves those more slowly than
tcmalloc's per-thread caches. With tcmalloc preloaded a 128-request bfloat16 decode step took
~9% less on a 2-core AVX512-BF16 CPU, almost all of it in the projections (README, "Memory
allocator"). A library can only be preloaded before the process starts, so the command line
re-executes itself once, with the same pid and arguments, with tcmalloc in LD_PRELOAD, where:

  * a tcmalloc library is installed (Debian/Ubuntu: libtcmalloc-minimal4; `make setup` tries to
    install it), and
  * it is not loaded already, and TOKENMILL_TCMALLOC is not "0" (set it to run on glibc's malloc).

Python programs that use `tokenmill.LLM` directly pick their allocator themselves:
`LD_PRELOAD=$(python -m tokenmill.entrypoints.allocator) python script.py`.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

DISABLE_ENV = "TOKENMILL_TCMALLOC"
# Where Debian/Ubuntu and Fedora-family distributions put it; find_library covers the rest of ld's path.
CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
              "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc (the minimal build first), or None."""
    for path in CANDIDATES:
        if Path(path).is_file():
            return path
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)  # a soname (libtcmalloc_minimal.so.4): LD_PRELOAD takes it as is
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (mapped into it, by LD_PRELOAD or otherwise)."""
    try:
        return "libtcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def preload_env(env: dict[str, str], library: str | None, loaded: bool) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` is preloaded, or None to run as is
    (disabled, nothing to preload, already loaded, or already asked for: no exec loop)."""
    if env.get(DISABLE_ENV) == "0" or library is None or loaded:
        return None
    preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if library in preload:
        return None  # preloaded and still not mapped: the loader refused it; do not loop
    return {**env, "LD_PRELOAD": ":".join([library, *preload])}


def reexec_with_tcmalloc() -> None:
    """Replace this process by itself with tcmalloc preloaded, where preload_env says to; returns
    only when it does not."""
    env = preload_env(dict(os.environ), find_tcmalloc(), tcmalloc_loaded())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


if __name__ == "__main__":  # print the library's path for LD_PRELOAD (nothing when none is installed)
    path = find_tcmalloc()
    if path:
        print(path)
