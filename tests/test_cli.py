"""EngineConfig and the command line: engine flags built from its fields, and `tokenmill bench workload`."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, asdict, fields
from pathlib import Path

import pytest

from tokenmill.config import EngineConfig
from tokenmill.entrypoints.cli import SIMULATED_KNOBS, build_parser, engine_kwargs, main
from tokenmill.workload import load_workload

ENGINE_COMMANDS = {"generate": [], "serve": [], "bench throughput": ["--workload", "w.jsonl"],
                   "bench calibrate": []}


@pytest.mark.parametrize("command", list(ENGINE_COMMANDS))
def test_every_engine_command_takes_every_knob_with_its_default(command):
    args = build_parser().parse_args(command.split() + ENGINE_COMMANDS[command])
    assert engine_kwargs(args) == asdict(EngineConfig())


def test_engine_flags_follow_the_fields():
    argv = ["generate", "--model", "m", "--dtype", "float32", "--max-model-len", "512", "--no-chunked-prefill",
            "--no-prefix-caching", "--no-admission-control", "--trace", "t.jsonl", "--log-steps",
            "--async-scheduling", "--kv-cache-memory", "1024", "--num-kv-blocks", "8", "--scheduling-policy", "sjf",
            "--sjf-aging-rate", "2.5", "--preemption-mode", "swap", "--swap-space", "4096",
            "--max-queued-requests", "3", "--tokenizer", "tok"]
    kwargs = engine_kwargs(build_parser().parse_args(argv))
    assert {k: v for k, v in kwargs.items() if v != getattr(EngineConfig(), k)} == dict(
        model="m", dtype="float32", max_model_len=512, enable_chunked_prefill=False, enable_prefix_caching=False,
        enable_admission_control=False, trace_path="t.jsonl", log_steps=True, async_scheduling=True,
        kv_cache_memory=1024, num_kv_blocks=8, scheduling_policy="sjf", sjf_aging_rate=2.5, preemption_mode="swap",
        swap_space=4096, max_queued_requests=3, tokenizer="tok")
    assert engine_kwargs(build_parser().parse_args(["serve", "--no-async-scheduling"]))["async_scheduling"] is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--dtype", "float64"])  # the field's choices


def test_simulate_takes_the_scheduler_knobs_only():
    args = build_parser().parse_args(["simulate", "--workload", "w", "--arrival-rate", "1", "--block-size", "4",
                                      "--no-admission-control", "--seed", "3"])
    kwargs = engine_kwargs(args, SIMULATED_KNOBS)
    assert set(kwargs) == set(SIMULATED_KNOBS) <= {f.name for f in fields(EngineConfig)}
    assert kwargs["block_size"] == 4 and kwargs["enable_admission_control"] is False
    assert args.seed == 3  # the arrival seed, not the sampler's


def test_config_is_frozen_and_finalize_returns_the_resolved_copy():
    config = EngineConfig(num_threads=1)
    resolved = config.finalize(1024)
    assert config.max_model_len is None and config.max_num_batched_tokens is None  # unchanged
    assert (resolved.max_model_len, resolved.max_num_batched_tokens) == (1024, 512)
    assert resolved.async_scheduling == (1 < len(os.sched_getaffinity(0)))  # a core left over for it
    assert resolved.finalize(1024) == resolved and resolved.finalize(4096) == resolved
    with pytest.raises(FrozenInstanceError):
        resolved.max_num_seqs = 1
    with pytest.raises(ValueError, match="exceeds"):
        resolved.finalize(512)


# The team's generator, next to the repository (../shared/bench/workload.py); not in a clone.
SHARED_WORKLOAD_PY = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workload.py"


@pytest.mark.skipif(not SHARED_WORKLOAD_PY.exists(), reason=f"no {SHARED_WORKLOAD_PY} to compare with")
@pytest.mark.parametrize("args", [
    [],  # wl_main
    ["--n", "64", "--prompt", "128:128", "--output", "128:128", "--seed", "2"],  # wl_serve
    ["--n", "64", "--prompt", "16:64", "--output", "64:128", "--shared-prefix", "512", "--seed", "1"],
    ["--n", "5", "--prompt", "1:3", "--output", "1:1", "--seed", "9", "--vocab-size", "1000"],
], ids=["defaults", "serve", "shared-prefix", "small-vocab"])
def test_bench_workload_writes_what_the_shared_script_writes(tmp_path, capsys, args):
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    assert main(["bench", "workload", "--out", str(ours), *args]) == 0
    printed = capsys.readouterr().out
    shared = subprocess.run([sys.executable, str(SHARED_WORKLOAD_PY), "--out", str(theirs), *args],
                            capture_output=True, text=True, check=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert printed.replace(str(ours), "FILE") == shared.stdout.replace(str(theirs), "FILE")
    n = int(args[args.index("--n") + 1]) if "--n" in args else 128
    assert len(load_workload(str(ours))) == n  # and the reader takes it


def test_bench_workload_rejects_a_bad_range(tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "workload", "--out", str(tmp_path / "w"), "--prompt", "64"])
