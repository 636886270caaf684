"""Scheduler: decides, each step, which requests run and how many of their tokens.

Pure Python, no tensors. Each step has a token budget (max_num_batched_tokens) and a sequence
budget (max_num_seqs). It is spent in two phases:

  1. running requests, in order: each takes what it still lacks (one token for a decode, the next
     chunk for a prompt being prefilled). If its blocks can't be allocated, the policy picks a
     victim among the running requests not yet scheduled, which is preempted (recompute: its blocks
     are freed and it waits again with num_computed_tokens = 0), until the allocation fits.
  2. waiting requests, in policy order, while budget, sequences and blocks last (skipped in a step
     that had to preempt: admitting now would only preempt again next step).

So decodes always come before new prompts, and a long prompt is cut to the budget left over
(chunked prefill) instead of stalling the decodes of others.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.policy import SchedulingPolicy
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step, as the model runner needs it (not the Request itself).

    token_ids and block_ids are copies; prompt_token_ids and output_token_ids are the request's own
    lists (read by the sampler for penalties before the engine appends this step's token).
    """
    request_id: str
    token_ids: list[int]  # the tokens fed this step
    start_pos: int  # position of token_ids[0] == num_computed_tokens before the step
    block_ids: list[int]  # block table after this step's allocation
    samples: bool  # the step reaches the request's last known token: sample the next one
    is_prefill: bool
    sampling_params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prefills(self) -> int:
        return sum(s.is_prefill for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(not s.is_prefill for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManager,
                 policy: SchedulingPolicy) -> None:
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.chunked_prefill = config.enable_chunked_prefill
        self.kv = kv_cache_manager
        self.waiting = policy
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- bookkeeping ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted): leave the queues, give back its blocks."""
        assert status.finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)

    @property
    def num_swapped(self) -> int:
        return 0

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    def live_requests(self) -> Iterable[Request]:
        yield from self.running
        yield from self.waiting

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.live_requests())

    # ---- the step decision ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        out.num_running = len(self.running)
        out.num_waiting = len(self.waiting)
        out.num_free_blocks = self.kv.num_free_blocks
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.waiting.choose_victim(self.running[i:])
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self._take(req, num_new, out)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.peek()
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget and not self.chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new):
                break
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._take(req, num_new, out)
            budget -= num_new

    def _take(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        start = req.num_computed_tokens
        req.num_computed_tokens += num_new
        out.scheduled.append(ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start:start + num_new],
            start_pos=start,
            block_ids=list(req.block_ids),
            samples=req.num_computed_tokens == req.num_tokens,
            is_prefill=num_new > 1 or start < req.num_prompt_tokens,
            sampling_params=req.sampling_params,
            generator=req.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
        ))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        # Recompute preemption: drop the KV, keep the tokens; they are computed again on resume.
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.add_preempted(req)
        out.preempted_ids.append(req.request_id)
