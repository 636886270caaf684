"""One record per engine step: what ran, what it cost, what state the queues were left in."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepRecord:
    step: int
    t_start: float
    t_end: float
    num_prefills: int
    num_decodes: int
    num_tokens: int
    num_running: int
    num_waiting: int
    free_blocks: int
    num_preempted: int
    num_finished: int

    def format(self) -> str:
        return (f"step {self.step:5d} | prefill {self.num_prefills:3d} decode {self.num_decodes:3d} "
                f"| tokens {self.num_tokens:5d} | running {self.num_running:3d} waiting {self.num_waiting:3d} "
                f"| free blocks {self.free_blocks:5d} | preempted {self.num_preempted} "
                f"finished {self.num_finished} | {(self.t_end - self.t_start) * 1e3:7.1f} ms")
