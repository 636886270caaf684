"""Engine-wide figures: gauges of the current state and counters since start."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    # Gauges: the state after the last step.
    num_running: int
    num_waiting: int
    num_swapped: int
    num_free_blocks: int
    num_cached_blocks: int  # free blocks that still hold a reusable prefix
    kv_cache_usage: float  # used blocks / all blocks
    # Counters: totals since the engine started (never reset, so rates and ratios are exact).
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int
    prompt_tokens: int  # prompt tokens of finished-or-running requests, counted once when first scheduled
    generation_tokens: int  # tokens sampled
    num_steps: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
