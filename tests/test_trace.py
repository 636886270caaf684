"""Step trace (trace_path / --trace), `tokenmill trace show | plot` and the timeline derivation."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.timeline import Segment, build_timeline, format_steps, plot_timeline, summarize
from tokenmill.engine.trace import StepRecord, read_trace
from tokenmill.entrypoints.cli import main

MAX_BATCHED = 48


def _prompts(n: int, seed: int, lo: int = 8, hi: int = 80) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def traced_run(request, tiny_llama_dir, tmp_path_factory):
    """A tiny-model run with chunked prefill (a 48-token budget) and a trace file."""
    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=MAX_BATCHED,
              max_num_seqs=6, num_threads=1, trace_path=str(path), async_scheduling=request.param)
    prompts = _prompts(10, seed=1)
    max_tokens = [3 + 2 * i for i in range(len(prompts))]
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens],
                           use_tqdm=False)
    llm.llm_engine.close()
    return path, llm, prompts, outputs


@pytest.fixture(scope="module")
def preempting_trace(tiny_llama_dir, tmp_path_factory):
    """Runs that run out of KV blocks (16 blocks of 16 tokens): recompute and swap preemption."""
    paths = {}
    for mode in ("recompute", "swap"):
        path = tmp_path_factory.mktemp("trace") / f"{mode}.jsonl"
        llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, kv_cache_memory=16 * 16 * 512,
                  enable_admission_control=False, preemption_mode=mode, num_threads=1, trace_path=str(path))
        assert llm.llm_engine.num_total_blocks == 16
        llm.generate(_prompts(8, seed=2, lo=20, hi=60), SamplingParams(max_tokens=40, ignore_eos=True),
                     use_tqdm=False)
        llm.llm_engine.close()
        paths[mode] = path
    return paths


def test_trace_has_one_consistent_record_per_step(traced_run):
    path, llm, prompts, outputs = traced_run
    records = read_trace(str(path))
    assert [r.step for r in records] == list(range(1, llm.llm_engine.num_steps + 1))
    seen: dict[str, int] = {}  # request id -> num_computed_tokens expected at its next step
    finished = Counter()
    for prev, r in zip([None] + records, records):
        assert r.t_start <= r.t_end
        if prev is not None:
            assert prev.t_end <= r.t_start
        assert 0 < r.num_tokens <= MAX_BATCHED
        assert len(r.scheduled) <= 6
        assert len({s["request_id"] for s in r.scheduled}) == len(r.scheduled)
        for s in r.scheduled:
            rid = s["request_id"]
            assert s["num_computed_tokens"] == seen.get(rid, 0)  # no preemption here: steps continue
            assert s["phase"] == ("prefill" if s["num_computed_tokens"] < len(prompts[int(rid)]["prompt_token_ids"])
                                  else "decode")
            seen[rid] = s["num_computed_tokens"] + s["num_tokens"]
        assert r.preempted == []
        # The queues as the step's decision left them: its own finishers still count, and with
        # overlap (decided before the previous step's outputs were seen) so may the previous step's.
        live = r.num_running + r.num_waiting
        if llm.llm_engine.config.async_scheduling:
            assert len(prompts) - sum(finished.values()) <= live <= len(prompts) - sum(finished.values()) + \
                (len(prev.finished) if prev else 0)
        else:
            assert live == len(prompts) - sum(finished.values())
        finished.update(r.finished)
    ids = {o.request_id for o in outputs}
    assert set(seen) == ids  # every request appears
    assert finished == Counter({rid: 1 for rid in ids})  # finished exactly once each
    for o in outputs:  # every token was computed once: prompt + outputs, less the last sampled one
        assert seen[o.request_id] == len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1
    assert any(s["num_tokens"] < len(prompts[int(s["request_id"])]["prompt_token_ids"])
               for r in records for s in r.scheduled if s["phase"] == "prefill")  # chunked prefill happened
    assert records[-1].num_running == len(records[-1].finished) and records[-1].num_waiting == 0


def test_cli_generate_writes_trace(tiny_llama_dir, tmp_path, capsys):
    workload = tmp_path / "wl.jsonl"
    workload.write_text("".join(json.dumps({"prompt_token_ids": p["prompt_token_ids"], "max_tokens": 4}) + "\n"
                                for p in _prompts(3, seed=3)))
    trace = tmp_path / "t.jsonl"
    rc = main(["generate", "--model", str(tiny_llama_dir), "--dtype", "float32", "--kv-cache-memory", str(16 << 20), "--num-threads", "1",
               "--ignore-eos", "--quiet", "--prompts-file", str(workload), "--trace", str(trace)])
    assert rc == 0
    records = read_trace(str(trace))
    assert records and sum(len(r.finished) for r in records) == 3
    assert sum(s["phase"] == "decode" for r in records for s in r.scheduled) == 3 * 3


def test_trace_show(traced_run, capsys):
    path, llm, prompts, outputs = traced_run
    records = read_trace(str(path))
    assert main(["trace", "show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == len(records)
    for line, r in zip(step_lines, records):
        assert line.split()[1] == str(r.step)
        assert line.count("█") == len(r.scheduled)  # unscaled: one block per request
        assert f"({r.num_prefills} prefill, {r.num_decodes} decode)" in line
        assert line.split(" tok")[0].split()[-1] == str(r.num_tokens)
        assert ("finished" in line) == bool(r.finished)
    summary = lines[-1]
    s = summarize(records)
    assert f"{len(records)} steps" in summary and "preemptions 0" in summary
    assert f"batch size mean {s['mean_batch_size']:.1f}, max {s['max_batch_size']}" in summary
    assert f"requests {len(prompts)}, finished {len(prompts)}" in summary


def test_trace_show_scales_long_bars():
    rec = StepRecord(step=1, t_start=0.0, t_end=1.0, scheduled=[
        {"request_id": str(i), "num_tokens": 1, "num_computed_tokens": 5, "phase": "decode"} for i in range(100)])
    small = StepRecord(step=2, t_start=1.0, t_end=2.0, scheduled=rec.scheduled[:10])
    lines = format_steps([rec, small], width=40)
    assert lines[0].count("█") == 40 and lines[1].count("█") == 4
    assert "100 (0 prefill, 100 decode)" in lines[0]
    assert lines[-1] == "(bars scaled: 40 characters = 100 requests)"


def test_trace_show_counts_preemptions(preempting_trace, capsys):
    records = read_trace(str(preempting_trace["recompute"]))
    n = sum(len(r.preempted) for r in records)
    assert n > 0
    assert main(["trace", "show", str(preempting_trace["recompute"]), "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert f"preemptions {n} |" in out
    assert len(out.splitlines()) == 1  # no step lines


def test_trace_plot_writes_png(traced_run, preempting_trace, tmp_path, capsys):
    for src in (traced_run[0], preempting_trace["swap"]):
        png = tmp_path / f"{src.stem}.png"
        assert main(["trace", "plot", str(src), "-o", str(png)]) == 0
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(ValueError):
        plot_timeline([], str(tmp_path / "empty.png"))


def _rec(step, t, scheduled=(), preempted=(), finished=(), num_swapped=0):
    return StepRecord(step=step, t_start=t, t_end=t + 0.5,
                      scheduled=[{"request_id": rid, "num_tokens": n, "num_computed_tokens": c, "phase": ph}
                                 for rid, n, c, ph in scheduled],
                      preempted=list(preempted), finished=list(finished), num_swapped=num_swapped)


def test_timeline_lanes_by_hand():
    # A: prefill, decode, preempted (recompute: resumes from 0), prefill again, decode, done.
    # B: waits one step, prefill, swapped out (num_swapped > 0, resumes with its KV), decode, done.
    # C: prefill, not in step 3's batch (waiting), decode, preempted and never resumed.
    records = [
        _rec(1, 10.0, [("A", 8, 0, "prefill"), ("C", 4, 0, "prefill")]),
        _rec(2, 11.0, [("A", 1, 8, "decode"), ("B", 6, 0, "prefill")]),
        _rec(3, 12.0, [("B", 1, 6, "decode")], preempted=["A"], num_swapped=0),
        _rec(4, 13.0, [("C", 1, 4, "decode")], preempted=["B"], num_swapped=1),
        _rec(5, 14.0, [("A", 10, 0, "prefill")], preempted=["C"], num_swapped=1),
        _rec(6, 15.0, [("A", 1, 10, "decode"), ("B", 1, 7, "decode")], finished=["A"]),
        _rec(7, 16.0, [("B", 1, 8, "decode")], finished=["B"]),
    ]
    tl = build_timeline(records)
    assert list(tl.lanes) == ["A", "C", "B"]  # by first step
    assert tl.duration == 6.5 and tl.batch_sizes == [2, 2, 1, 1, 1, 2, 1] and tl.num_tokens[0] == 12

    def spans(rid):
        return [(s.state, s.t0, s.t1) for s in tl.lanes[rid]]

    assert spans("A") == [("prefill", 0, 1), ("decode", 1, 2), ("preempted", 2, 4), ("prefill", 4, 5),
                          ("decode", 5, 6), ("done", 6, 6.5)]
    assert spans("B") == [("waiting", 0, 1), ("prefill", 1, 2), ("decode", 2, 3), ("swapped", 3, 5),
                          ("decode", 5, 6.5)]
    assert spans("C") == [("prefill", 0, 1), ("waiting", 1, 3), ("decode", 3, 4), ("preempted", 4, 6.5)]
    # Known arrival times start the waiting lane there instead of at the trace start.
    late = build_timeline(records, arrivals={"B": 10.25})
    assert late.lanes["B"][0] == Segment("waiting", 0.25, 1.0)


def test_timeline_of_real_preemptions(preempting_trace):
    for mode, resumed_state in (("recompute", "preempted"), ("swap", "swapped")):
        records = read_trace(str(preempting_trace[mode]))
        preempted = {rid for r in records for rid in r.preempted}
        assert preempted, mode
        tl = build_timeline(records)
        assert len(tl.lanes) == 8
        for rid, segments in tl.lanes.items():
            states = [s.state for s in segments]
            assert states[-1] == "done" or segments[-1].t1 == tl.duration
            assert all(a.t1 == b.t0 for a, b in zip(segments, segments[1:]))  # gapless
            if rid in preempted:
                assert resumed_state in states, (mode, rid, states)
            else:
                assert "preempted" not in states and "swapped" not in states
