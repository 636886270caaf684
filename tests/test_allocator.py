"""The command line's tcmalloc preload: when it re-executes, with what environment, and that the
re-executed process (same pid) runs on tcmalloc where one is installed."""
import os
import subprocess
import sys

import pytest

from tokenmill.entrypoints.allocator import DISABLE_ENV, find_tcmalloc, preload_env

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_preload_env_prepends_the_library_and_keeps_what_was_preloaded():
    assert preload_env({"PATH": "/bin"}, LIB, loaded=False) == {"PATH": "/bin", "LD_PRELOAD": LIB}
    assert preload_env({"LD_PRELOAD": "/opt/a.so /opt/b.so"}, LIB, loaded=False)["LD_PRELOAD"] == \
        f"{LIB}:/opt/a.so:/opt/b.so"


@pytest.mark.parametrize("env, library, loaded", [
    ({DISABLE_ENV: "0"}, LIB, False),  # turned off
    ({}, None, False),  # nothing installed
    ({}, LIB, True),  # already running on it
    ({"LD_PRELOAD": LIB}, LIB, False),  # asked for and refused by the loader: no exec loop
], ids=["disabled", "not-installed", "loaded", "refused"])
def test_preload_env_runs_as_is(env, library, loaded):
    assert preload_env(env, library, loaded) is None


def _run_main(extra_env):
    """`main()` as the command line calls it, in a child that reports its pid and allocator first."""
    code = ("import os, sys\n"
            "from tokenmill.entrypoints.allocator import tcmalloc_loaded\n"
            "print('pid', os.getpid(), 'tcmalloc', tcmalloc_loaded(), flush=True)\n"
            "sys.argv = ['tokenmill', '--help']\n"
            "from tokenmill.entrypoints.cli import main\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", DISABLE_ENV)} | extra_env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines() if line.startswith("pid ")]


@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc installed (libtcmalloc-minimal4)")
def test_command_line_reexecutes_itself_on_tcmalloc():
    first, second = _run_main({})
    assert first[1] == second[1]  # the same process, re-executed
    assert (first[3], second[3]) == ("False", "True")


def test_command_line_stays_on_glibc_when_disabled():
    (only,) = _run_main({DISABLE_ENV: "0"})
    assert only[3] == "False"
