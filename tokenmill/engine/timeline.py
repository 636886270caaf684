"""Timelines of a step trace (the JSONL file `trace_path` writes): text bars and a PNG picture.

A trace knows a request only from the steps that name it (scheduled, preempted, finished), so a
request's lane is derived step by step. Step i covers [t_start of step i, t_start of step i+1):

    waiting    trace start -> first step that schedules it; also a running request that got no
               share of a step's token budget
    prefill    scheduled with phase "prefill" (prompt chunks, and the recompute after preemption)
    decode     scheduled with phase "decode"
    preempted  listed in a step's `preempted` -> scheduled again (recompute: resumes from 0)
    swapped    the same, but swapped out: the step that preempted it had num_swapped > 0 and it
               resumed with num_computed_tokens > 0 (its KV came back; a recompute resumes from 0
               or from a prefix-cache hit, which can only happen where nothing was swapped)
    done       after the step that lists it in `finished`

NOTE: the step records have no arrival times, so "waiting" starts at the trace start unless
arrival times are given (a JSON {request_id: time} file next to the trace, `<trace>.arrivals.json`,
which `tokenmill simulate --trace` writes). From the trace start is exact for an offline batch
(LLM.generate adds every request before the first step) and an upper bound for requests that
arrived later (a server).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from tokenmill.engine.trace import StepRecord

STATES = ("waiting", "prefill", "decode", "preempted", "swapped", "done")
COLORS = {
    "waiting": "#d3d3d3",
    "prefill": "#f28e2b",
    "decode": "#4e79a7",
    "preempted": "#e15759",
    "swapped": "#9c6ade",
    "done": "#e3efe0",
}


@dataclass
class Segment:
    state: str
    t0: float  # seconds since the trace start
    t1: float


@dataclass
class Timeline:
    duration: float  # seconds from the first step's start to the last step's end
    step_times: list[float]  # start of each step, seconds since the trace start
    batch_sizes: list[int]
    num_tokens: list[int]
    num_preempted: list[int]
    lanes: dict[str, list[Segment]] = field(default_factory=dict)  # request id -> segments, in lane order


def arrivals_path(trace_path: str) -> str:
    """Where the arrival times of a trace's requests are kept, if anywhere: x.jsonl -> x.arrivals.json."""
    root, ext = os.path.splitext(trace_path)
    return (root if ext in (".jsonl", ".json") else trace_path) + ".arrivals.json"


def write_arrivals(trace_path: str, arrivals: dict[str, float]) -> None:
    with open(arrivals_path(trace_path), "w") as f:
        json.dump(arrivals, f)


def read_arrivals(trace_path: str) -> dict[str, float] | None:
    path = arrivals_path(trace_path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {str(k): float(v) for k, v in json.load(f).items()}


def build_timeline(records: list[StepRecord], arrivals: dict[str, float] | None = None) -> Timeline:
    """The lanes and per-step series of a trace; `arrivals` (request id -> time on the trace's clock)
    starts each lane's "waiting" at its arrival instead of at the trace start."""
    if not records:
        return Timeline(0.0, [], [], [], [])
    t0 = records[0].t_start
    # bounds[i], bounds[i + 1]: the span of step i (up to the next step's start, so lanes are gapless)
    bounds = [r.t_start - t0 for r in records] + [records[-1].t_end - t0]
    # request id -> {step index: (kind, payload)}, kinds applied in the order preempt, run, finish
    events: dict[str, dict[int, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for i, rec in enumerate(records):
        for rid in rec.preempted:
            events[rid][i].append(("preempt", rec.num_swapped > 0))
        for s in rec.scheduled:
            events[s["request_id"]][i].append(("run", s["phase"], s["num_computed_tokens"]))
        for rid in rec.finished:
            events[rid][i].append(("finish",))

    def first_run(rid: str) -> int:
        runs = [i for i, evs in events[rid].items() if any(e[0] == "run" for e in evs)]
        return min(runs) if runs else len(records)

    arrivals = arrivals or {}
    lanes = {rid: _lane(events[rid], bounds, min(max(arrivals.get(rid, t0) - t0, 0.0), bounds[-1]))
             for rid in sorted(events, key=lambda r: (first_run(r), _natural(r)))}
    return Timeline(
        duration=bounds[-1], step_times=bounds[:-1], batch_sizes=[len(r.scheduled) for r in records],
        num_tokens=[r.num_tokens for r in records], num_preempted=[len(r.preempted) for r in records],
        lanes=lanes)


def _lane(events: dict[int, list[tuple]], bounds: list[float], start: float) -> list[Segment]:
    """One request's segments: per-step states, run-length encoded."""
    num_steps = len(bounds) - 1
    first, last = min(events), max(events)
    states: list[str] = []  # state of steps first..last
    preempt_start: int | None = None  # index into states where the current preemption began
    swap_context = False
    state = "waiting"
    finished = False
    for i in range(first, last + 1):
        step_state = None
        for ev in events.get(i, ()):
            if ev[0] == "preempt":
                state, preempt_start, swap_context = "preempted", len(states), ev[1]
            elif ev[0] == "run":
                if preempt_start is not None:
                    if swap_context and ev[2] > 0:
                        states[preempt_start:] = ["swapped"] * (len(states) - preempt_start)
                    preempt_start = None
                step_state = ev[1]
            else:
                finished = True
        if step_state is not None:
            states.append(step_state)
            state = "waiting"  # unless the next step runs it again
        else:
            states.append(state)

    segments = [Segment("waiting", start, bounds[first])] if bounds[first] > start else []
    for k, st in enumerate(states):
        i = first + k
        if segments and segments[-1].state == st:
            segments[-1].t1 = bounds[i + 1]
        else:
            segments.append(Segment(st, bounds[i], bounds[i + 1]))
    tail = "done" if finished else states[-1] if states else "waiting"
    if last + 1 < num_steps:
        if segments and segments[-1].state == tail:
            segments[-1].t1 = bounds[-1]
        else:
            segments.append(Segment(tail, bounds[last + 1], bounds[-1]))
    return [s for s in segments if s.t1 > s.t0]


def _natural(rid: str) -> tuple:
    """Sort "2" before "10" (the engine's ids are counters), other ids alphabetically after."""
    return (0, int(rid), "") if rid.isdigit() else (1, 0, rid)


# ---- text ------------------------------------------------------------------------------------------


def summarize(records: list[StepRecord]) -> dict:
    steps = len(records)
    batch = [len(r.scheduled) for r in records]
    tokens = [r.num_tokens for r in records]
    requests = {s["request_id"] for r in records for s in r.scheduled}
    return {
        "steps": steps,
        "duration_s": (records[-1].t_end - records[0].t_start) if records else 0.0,
        "mean_batch_size": sum(batch) / steps if steps else 0.0,
        "max_batch_size": max(batch, default=0),
        "mean_tokens_per_step": sum(tokens) / steps if steps else 0.0,
        "prefill_tokens": sum(s["num_tokens"] for r in records for s in r.scheduled if s["phase"] == "prefill"),
        "decode_tokens": sum(s["num_tokens"] for r in records for s in r.scheduled if s["phase"] == "decode"),
        "preemptions": sum(len(r.preempted) for r in records),
        "requests": len(requests),
        "finished": sum(len(r.finished) for r in records),
    }


def format_steps(records: list[StepRecord], width: int = 40) -> list[str]:
    """One line per step: the batch as a bar, its prefill / decode split and its tokens.

    step   12 ███            3 (1 prefill, 2 decode)    137 tok
    """
    max_batch = max((len(r.scheduled) for r in records), default=0)
    scale = min(1.0, width / max_batch) if max_batch else 1.0
    bar_width = max(1, round(max_batch * scale))
    step_w = len(str(max((r.step for r in records), default=0)))
    lines = []
    for r in records:
        n = len(r.scheduled)
        bar = "█" * (max(1, round(n * scale)) if n else 0)
        line = (f"step {r.step:>{step_w}} {bar:<{bar_width}} {n:>3} ({r.num_prefills} prefill, "
                f"{r.num_decodes} decode) {r.num_tokens:>6} tok")
        extra = []
        if r.preempted:
            extra.append(f"preempted {len(r.preempted)}")
        if r.finished:
            extra.append(f"finished {len(r.finished)}")
        if extra:
            line += "  " + ", ".join(extra)
        lines.append(line)
    if scale < 1.0:
        lines.append(f"(bars scaled: {width} characters = {max_batch} requests)")
    return lines


def format_summary(records: list[StepRecord]) -> str:
    s = summarize(records)
    tok_per_s = (s["prefill_tokens"] + s["decode_tokens"]) / s["duration_s"] if s["duration_s"] > 0 else 0.0
    return (f"{s['steps']} steps in {s['duration_s']:.2f} s | batch size mean {s['mean_batch_size']:.1f}, "
            f"max {s['max_batch_size']} | tokens per step mean {s['mean_tokens_per_step']:.1f} "
            f"({s['prefill_tokens']} prefill, {s['decode_tokens']} decode, {tok_per_s:.1f} tok/s) | "
            f"preemptions {s['preemptions']} | requests {s['requests']}, finished {s['finished']}")


# ---- picture ---------------------------------------------------------------------------------------


def plot_timeline(records: list[StepRecord], out_path: str, title: str | None = None,
                  arrivals: dict[str, float] | None = None, max_lanes: int = 200) -> None:
    """Write a PNG: batch size and tokens per step over time (top), one lane per request (bottom).

    Past `max_lanes` requests, every k-th lane is drawn (the top panel still counts them all).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not records:
        raise ValueError("the trace has no steps to plot")
    tl = build_timeline(records, arrivals)
    every = -(-len(tl.lanes) // max_lanes) if max_lanes > 0 else 1
    lanes = list(tl.lanes.items())[::every]
    n_lanes = len(lanes)
    lanes_h = min(14.0, max(2.5, 0.22 * n_lanes))
    fig, (ax_top, ax) = plt.subplots(
        2, 1, sharex=True, figsize=(13, 2.8 + lanes_h + 0.8),
        gridspec_kw={"height_ratios": [2.8, lanes_h], "hspace": 0.08})

    # Top: batch size (left axis) and tokens per step (right axis), as step functions over time.
    xs = tl.step_times + [tl.duration]
    ax_tok = ax_top.twinx()
    ax_tok.fill_between(xs, tl.num_tokens + tl.num_tokens[-1:], step="post", color="#f28e2b", alpha=0.25,
                        linewidth=0)
    ax_tok.set_ylabel("tokens / step", color="#b35f00")
    ax_tok.tick_params(axis="y", colors="#b35f00")
    ax_tok.set_ylim(0, max(tl.num_tokens) * 1.15 or 1)
    ax_top.step(xs, tl.batch_sizes + tl.batch_sizes[-1:], where="post", color="#2f4b7c", linewidth=1.4)
    ax_top.set_ylabel("batch size\n(requests)", color="#2f4b7c")
    ax_top.tick_params(axis="y", colors="#2f4b7c")
    ax_top.set_ylim(0, max(tl.batch_sizes) * 1.15 or 1)
    ax_top.set_zorder(ax_tok.get_zorder() + 1)
    ax_top.patch.set_visible(False)
    preempt_x = [t for t, n in zip(tl.step_times, tl.num_preempted) if n]
    if preempt_x:
        ax_top.plot(preempt_x, [max(tl.batch_sizes) * 1.07] * len(preempt_x), "v", color=COLORS["preempted"],
                    markersize=5)
    s = summarize(records)
    ax_top.set_title(title or (f"{s['steps']} steps, {s['requests']} requests, mean batch "
                               f"{s['mean_batch_size']:.1f}, {s['preemptions']} preemptions"), fontsize=11)

    # Bottom: one lane per request, coloured by state.
    height = 0.8
    for y, (_, segments) in enumerate(lanes):
        by_state: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for seg in segments:
            by_state[seg.state].append((seg.t0, seg.t1 - seg.t0))
        for state, spans in by_state.items():
            ax.broken_barh(spans, (y - height / 2, height), facecolors=COLORS[state], linewidth=0)
    ax.set_ylim(n_lanes - 0.5, -0.5)  # first-scheduled request on top
    if n_lanes <= 60:
        ax.set_yticks(range(n_lanes))
        ax.set_yticklabels([rid for rid, _ in lanes], fontsize=7 if n_lanes > 30 else 8)
    shown = f"every {every}th of {len(tl.lanes)}" if every > 1 else f"{n_lanes}"
    ax.set_ylabel(f"requests ({shown}), in order of first step")
    ax.set_xlabel("seconds since the first step")
    ax.set_xlim(0, tl.duration)
    handles = [Patch(facecolor=COLORS[st], edgecolor="#777777", linewidth=0.5, label=st) for st in STATES]
    handles += [Line2D([], [], color="#2f4b7c", label="batch size"),
                Patch(facecolor="#f28e2b", alpha=0.25, label="tokens / step"),
                Line2D([], [], marker="v", linestyle="", color=COLORS["preempted"], label="step with a preemption")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(left=0.07, right=0.93, top=0.95, bottom=0.85 / (2.8 + lanes_h + 0.8))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
