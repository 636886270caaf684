"""One record per engine step: what ran, what it cost, and the queues and blocks as the step's
scheduling decision left them (before its outputs finish anyone: with overlap scheduling the next
step is decided before this one's outputs are seen, so only this point is well defined).

The same record feeds the step log (--log-steps, one line per step) and the trace file
(trace_path, one JSON object per line) that `tokenmill trace` draws.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tokenmill.core.scheduler import SchedulerOutput


@dataclass
class StepRecord:
    step: int
    t_start: float
    t_end: float
    # [{request_id, num_tokens, num_computed_tokens (before the step), phase: "prefill" | "decode"}]
    scheduled: list[dict] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    free_blocks: int = 0
    cached_blocks: int = 0

    @classmethod
    def of_step(cls, step: int, t_start: float, t_end: float, scheduler_output: SchedulerOutput,
                finished: list[str]) -> "StepRecord":
        """The record of one step: what the scheduler decided and the queues it left (its stats)."""
        stats = scheduler_output.stats
        return cls(
            step=step, t_start=t_start, t_end=t_end,
            scheduled=[{"request_id": s.request_id, "num_tokens": s.num_tokens, "num_computed_tokens": s.start_pos,
                        "phase": "prefill" if s.is_prefill else "decode"} for s in scheduler_output.scheduled],
            preempted=list(scheduler_output.preempted_ids), finished=list(finished),
            num_running=stats.num_running, num_waiting=stats.num_waiting, num_swapped=stats.num_swapped,
            free_blocks=stats.num_free_blocks, cached_blocks=stats.num_cached_blocks)

    @property
    def num_prefills(self) -> int:
        return sum(s["phase"] == "prefill" for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(s["phase"] == "decode" for s in self.scheduled)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.scheduled)

    def format(self) -> str:
        return (f"step {self.step:5d} | prefill {self.num_prefills:3d} decode {self.num_decodes:3d} "
                f"| tokens {self.num_tokens:5d} | running {self.num_running:3d} waiting {self.num_waiting:3d} "
                f"swapped {self.num_swapped:3d} | free blocks {self.free_blocks:5d} cached {self.cached_blocks:5d} "
                f"| preempted {len(self.preempted)} finished {len(self.finished)} "
                f"| {(self.t_end - self.t_start) * 1e3:7.1f} ms")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "StepRecord":
        return cls(**json.loads(line))


class TraceWriter:
    """Appends one JSON line per step to a file, flushed each step so a crash keeps what ran."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "w")

    def write(self, record: StepRecord) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_trace(path: str) -> list[StepRecord]:
    with open(path) as f:
        return [StepRecord.from_json(line) for line in f if line.strip()]
