"""Scheduler: decides, each step, which requests run and how many of their tokens.

Pure Python, no tensors. Each step has a token budget (max_num_batched_tokens) and a sequence
budget (max_num_seqs), spent in phases:

  0. forks: the other samples of an n > 1 request join once its leader has sampled, sharing the
     leader's prompt blocks. Then, if the policy says so (priority), running requests of lower
     priority are preempted for a waiting request that could not be admitted otherwise.
  1. running requests, in order: each takes what it still lacks (one token for a decode, the next
     chunk for a prompt being prefilled). If its blocks can't be allocated, the policy picks a
     victim among the running requests not yet scheduled, which is preempted, until it fits.
  2. waiting requests (new, recompute-preempted and swapped ones alike), in policy order, while
     budget, sequences and blocks last, and (admission control) while the expected peak of blocks
     of the running requests plus the new one fits the cache. Skipped in a step whose phase 1 had
     to preempt: admitting now would only preempt again next step.

Admission control (as SGLang's): request i will hold a_i tokens once its known tokens are computed
and grow by one per step for its o_i expected remaining output tokens (o_i = max_tokens * the
output ratio learned from finished requests, less what it has made). Requests end in order of o;
just before the k-th (by o) ends, those still running hold sum_{o_i >= o_k} ceil((a_i + o_k) / bs)
blocks. The largest of these peaks must fit, or admitting now means preempting later.

Overlap scheduling: the engine may schedule step N+1 before it has processed step N's output.
A request that samples in step N then has a pending token (Request.num_pending_tokens): step N+1
feeds it as its input (a placeholder here, filled in by the model runner from step N's samples),
and a request that step N's token will surely end (max_tokens, max_model_len) is not scheduled
again. A stop token or string in step N's output is only seen later: that request's work in step
N+1 is wasted and its sample dropped by the engine.

So decodes always come before new prompts, and a long prompt is cut to the budget left over
(chunked prefill) instead of stalling the decodes of others.

Prefill/decode disaggregation. A producer's request that finishes normally keeps its blocks, leased
to a decode instance (kv_leases) until release_lease. A consumer's request with a remote prefill is
admitted into blocks for all but its last prompt token (its cached prefix reused, the new blocks not
entered in the prefix cache yet) and waits for the pull in waiting_for_remote_kv, holding no batch
slot; kv_load_finished then queues it again with those tokens computed, so it recomputes the last
prompt token and samples its first output itself (or, on failure, computes the prompt or fails).

Preemption is `recompute` (free the blocks, num_computed_tokens = 0, wait again) or `swap` (copy the
blocks to host memory, free them, wait with the same progress and copy them back when admitted
again; recompute when the host space is full).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.policy import SchedulingPolicy, make_policy
from tokenmill.distributed.kv_transfer.base import KVLoad
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

PENDING_TOKEN = -1  # stands for a request's pending token in ScheduledRequest.token_ids


@dataclass
class ScheduledRequest:
    """One request's share of a step, as the model runner needs it (not the Request itself).

    token_ids and block_ids are copies, and so is output_token_ids where the sampler needs it
    (penalties, min_tokens; else it is empty): the model runner may run while the engine appends
    tokens to the request. prompt_token_ids is the request's own list (it never changes).
    """
    request_id: str
    token_ids: list[int]  # the tokens fed this step; the last may be PENDING_TOKEN (see above)
    start_pos: int  # position of token_ids[0] == num_computed_tokens before the step
    block_ids: list[int]  # block table after this step's allocation
    will_sample: bool  # the step reaches the request's last known token: sample the next one
    is_prefill: bool
    sampling_params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # known outputs at scheduling time (a pending token not included)
    grammar: object = None  # the request's RequestGrammar (structured outputs), advanced by the sampler

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerStats:
    """The queues and the KV cache at one moment, counted by the scheduler: the one definition that
    the engine's stats, /metrics, the step trace, the server's queue limit and the simulator read."""
    num_running: int
    num_waiting: int  # waiting to start or resume: new, recompute-preempted, samples not yet forked
    num_swapped: int  # preempted with their KV in host memory (not counted in num_waiting)
    num_waiting_for_remote_kv: int  # pulling their prompt's KV from a prefill instance (no batch slot)
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int  # free blocks that still hold a reusable prefix
    # Counters since the scheduler started (never reset, so rates and ratios are exact).
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int

    @property
    def num_total_blocks(self) -> int:
        return self.num_used_blocks + self.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        """Used blocks / all blocks."""
        return self.num_used_blocks / self.num_total_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # Block copies to do before the forward pass, in this order: (src, dst) pairs.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # device -> host
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # host -> device
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # device -> device
    # KV pulls to start (prefill/decode disaggregation): into blocks just allocated for them.
    kv_loads: list[KVLoad] = field(default_factory=list)
    # The queues and the cache right after this decision (what the step trace records).
    stats: SchedulerStats | None = None

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
    def has_block_ops(self) -> bool:
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.has_block_ops and not self.kv_loads


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManager,
                 policy: SchedulingPolicy) -> None:
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.chunked_prefill = config.enable_chunked_prefill
        self.swap = config.preemption_mode == "swap"
        self.admission_control = config.enable_admission_control
        self.output_ratio = config.initial_output_ratio  # expected output tokens / max_tokens
        self.output_ratio_decay = config.output_ratio_decay
        self.kv = kv_cache_manager
        self.policy = policy  # the waiting queue (swapped requests included), in the policy's order
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.forks: dict[str, tuple[Request, list[Request]]] = {}  # leader id -> (leader, samples)
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self._preempted_only_for_waiting = False
        # Prefill/decode disaggregation. Consumer: requests whose prompt KV is being pulled (blocks
        # allocated, no batch slot), and aborted ones whose pull has not ended (their blocks are
        # written to until it does). Producer: finished requests whose blocks are leased to a consumer.
        self.kv_load_failure_policy = config.kv_load_failure_policy
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self._aborted_loads: dict[str, Request] = {}
        self.kv_leases: dict[str, Request] = {}

    @classmethod
    def from_config(cls, config: EngineConfig, num_blocks: int, num_host_blocks: int = 0) -> "Scheduler":
        """A scheduler over a KV cache of num_blocks device blocks (and num_host_blocks host blocks to
        swap to), with the policy config.scheduling_policy names."""
        kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, num_host_blocks)
        return cls(config, kv, make_policy(config.scheduling_policy, config))

    # ---- bookkeeping ----------------------------------------------------------------------------

    def add_request(self, request: Request, fork_of: Request | None = None) -> None:
        """Queue a new request (WAITING, or WAITING_FOR_GRAMMAR whose grammar is now ready); with
        fork_of, it is another sample of that (leader) request."""
        assert request.status in (RequestStatus.WAITING, RequestStatus.WAITING_FOR_GRAMMAR)
        assert not request.num_computed_tokens
        request.status = RequestStatus.WAITING
        if fork_of is not None:
            self.forks.setdefault(fork_of.request_id, (fork_of, []))[1].append(request)
        else:
            self.policy.add(request)

    def finish_request(self, request: Request, status: RequestStatus) -> bool:
        """End a request (stopped, length, aborted): leave the queues, give back its blocks. Returns True
        when its blocks are kept instead, leased to a decode instance (see release_lease)."""
        assert status.finished
        if request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            # A pull is writing into its blocks: they are freed when it ends (kv_load_finished).
            del self.waiting_for_remote_kv[request.request_id]
            self._aborted_loads[request.request_id] = request
            request.status = status
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.SWAPPED:
            self.swapped.remove(request)
            self.policy.remove(request)
        elif request.status == RequestStatus.WAITING:
            if not self._remove_pending_fork(request):
                self.policy.remove(request)
        # WAITING_FOR_GRAMMAR: never queued here, nothing to leave
        request.status = status
        # NOTE: one lease per id: a second request of the same id while the first's lease lives is not
        # leased (its answer carries no kv_transfer_params, so its decode instance computes the prompt).
        keep = (request.remote_decode and status != RequestStatus.FINISHED_ABORTED and bool(request.block_ids)
                and request.request_id not in self.kv_leases)
        if keep:
            self.kv_leases[request.request_id] = request
        else:
            self.kv.free(request)
        if status != RequestStatus.FINISHED_ABORTED:
            observed = request.num_output_tokens / request.sampling_params.max_tokens
            self.output_ratio = (self.output_ratio_decay * self.output_ratio
                                 + (1 - self.output_ratio_decay) * observed)
        return keep

    # ---- KV transfer (prefill/decode disaggregation) ----------------------------------------------

    def release_lease(self, request_id: str) -> None:
        """Producer: the consumer has read a finished request's blocks (or the lease ended): free them."""
        request = self.kv_leases.pop(request_id, None)
        if request is not None:
            self.kv.free(request)

    def kv_load_finished(self, request_id: str, error: str | None) -> Request | None:
        """Consumer: the pull into a request's blocks ended (error None: it succeeded). On success the
        request waits to be scheduled with all but its last prompt token computed; on failure it
        computes its prompt here (policy recompute) or is handed back, aborted, for the engine to
        fail (policy fail)."""
        aborted = self._aborted_loads.pop(request_id, None)
        if aborted is not None:
            aborted.num_loading_tokens = 0
            self.kv.free(aborted)
            return None
        req = self.waiting_for_remote_kv.pop(request_id, None)
        if req is None:
            return None
        req.remote_prefill = None
        if error is None:
            req.num_computed_tokens += req.num_loading_tokens
            req.num_cached_tokens = req.num_computed_tokens
            req.num_loading_tokens = 0
            self.kv.register_computed(req)
        else:
            req.num_loading_tokens = 0
            req.num_computed_tokens = 0
            self.kv.free(req)
            if self.kv_load_failure_policy == "fail":
                req.status = RequestStatus.FINISHED_ABORTED
                return req
        req.status = RequestStatus.WAITING
        self.policy.add_preempted(req)  # it has waited since it arrived
        return None

    @property
    def holds_aborted_loads(self) -> bool:
        """Aborted requests' blocks wait for their KV pulls to end."""
        return bool(self._aborted_loads)

    def _start_remote_load(self, req: Request, out: SchedulerOutput) -> bool | None:
        """Allocate blocks for the prompt KV the request pulls (all but its last token, less what the
        prefix cache holds) and queue the pull: True. False: no room now. None: nothing to pull (the
        cache holds it all, or the producer's blocks do not cover the prompt): compute it here."""
        remote, bs = req.remote_prefill, self.kv.block_size
        num_tokens = req.num_prompt_tokens - 1
        num_blocks = -(-num_tokens // bs)
        cached = self.kv.find_cached_prefix(req)
        if len(cached) >= num_blocks or len(remote.block_ids) < num_blocks:
            # A pull of no blocks: the producer frees its lease now rather than at its timeout.
            out.kv_loads.append(KVLoad(req.request_id, remote, [], []))
            req.remote_prefill = None
            return None
        num_cached = len(cached) * bs
        if not self.kv.allocate_slots(req, num_tokens - num_cached, cached, register=False):
            return False
        self.kv.record_prefix_lookup(req.num_tokens, num_cached)
        req.num_computed_tokens += num_cached
        req.num_loading_tokens = num_tokens - num_cached
        self.policy.pop()
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_for_remote_kv[req.request_id] = req
        out.kv_loads.append(KVLoad(req.request_id, remote, remote.block_ids[len(cached):num_blocks],
                                   req.block_ids[len(cached):num_blocks]))
        return True

    def append_token(self, request: Request, token_id: int) -> None:
        """A token sampled for `request` has come back from the model runner: it joins the
        request's tokens and is no longer pending."""
        request.append_token(token_id)
        request.num_pending_tokens = max(0, request.num_pending_tokens - 1)

    def _remove_pending_fork(self, request: Request) -> bool:
        for leader_id, (_, samples) in self.forks.items():
            if request in samples:
                samples.remove(request)
                if not samples:
                    del self.forks[leader_id]
                return True
        return False

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def num_waiting(self) -> int:
        """Requests waiting to start or resume, swapped ones not included."""
        return len(self.policy) - len(self.swapped) + sum(len(s) for _, s in self.forks.values())

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.policy) + sum(len(s) for _, s in self.forks.values()) \
            + len(self.waiting_for_remote_kv)

    def make_stats(self) -> SchedulerStats:
        """The queues and the KV cache now (every reader of these figures takes them from here)."""
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.running), num_waiting=self.num_waiting, num_swapped=self.num_swapped,
            num_waiting_for_remote_kv=len(self.waiting_for_remote_kv),
            num_used_blocks=kv.num_used_blocks, num_free_blocks=kv.num_free_blocks,
            num_cached_blocks=kv.num_cached_blocks, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self.num_preemptions)

    def live_requests(self) -> Iterable[Request]:
        yield from self.running
        yield from self.policy  # swapped requests included
        for _, samples in self.forks.values():
            yield from samples
        yield from self.waiting_for_remote_kv.values()
        yield from self._aborted_loads.values()  # finished, but their blocks are held until the pull ends
        yield from self.kv_leases.values()  # finished, their blocks leased to a decode instance

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.live_requests())

    # ---- the step decision ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._release_forks()
        self._preempt_for_waiting(out)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted_ids or self._preempted_only_for_waiting:
            self._schedule_waiting(out, budget)
        out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy = self.kv.take_pending_ops()
        out.stats = self.make_stats()
        return out

    def _release_forks(self) -> None:
        """Samples 1..n-1 of a request start once its leader has sampled (its prompt is computed):
        they share the leader's blocks for all but the last prompt token, which each computes
        itself to draw its own first token."""
        for leader_id, (leader, samples) in list(self.forks.items()):
            if leader.num_output_tokens == 0 and not leader.is_finished:
                continue
            del self.forks[leader_id]
            for sample in samples:
                if leader.status == RequestStatus.RUNNING and len(self.running) < self.max_num_seqs:
                    shared = sample.num_prompt_tokens - 1
                    self.kv.fork(leader, sample, shared)
                    sample.num_computed_tokens = shared
                    self._start_running(sample)
                else:
                    self.policy.add(sample)  # on its own (still sharing cached prefix blocks)

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        self._preempted_only_for_waiting = False
        while len(self.policy):
            head = self.policy.peek()
            first_chunk = min(head.num_tokens_with_pending - head.num_computed_tokens, self.max_num_batched_tokens)
            if len(self.running) < self.max_num_seqs and \
                    self.kv.num_new_blocks(head, first_chunk) <= self.kv.num_free_blocks:
                break
            victim = self.policy.preempt_for(head, self.running)
            if victim is None:
                break
            self._preempt(victim, out)
            self._preempted_only_for_waiting = True

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._ends_with_pending_token(req):
                i += 1  # its last token is in flight: nothing left to compute
                continue
            num_new = min(req.num_tokens_with_pending - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.policy.choose_victim(self.running[i:])
                self._preempt(victim, out)
                self._preempted_only_for_waiting = False
                if victim is req:
                    break
            else:
                self._schedule_tokens(req, num_new, out)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while len(self.policy) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.policy.peek()
            if req.num_pending_tokens:
                break  # preempted with its last sample in flight: resume once the engine has it
            if req.remote_prefill is not None:
                started = self._start_remote_load(req, out)
                if started:
                    continue
                if started is False:
                    break
            swapped = req.status == RequestStatus.SWAPPED
            # A request resuming after a KV pull holds its blocks already (and has been looked up);
            # prompt logprobs need every prompt position computed: no prefix-cache hits (as vLLM).
            holds_blocks = bool(req.block_ids)
            cached = [] if swapped or holds_blocks or req.sampling_params.prompt_logprobs is not None \
                else self.kv.find_cached_prefix(req)
            num_cached = len(cached) * self.kv.block_size
            num_new = req.num_tokens_with_pending - req.num_computed_tokens - num_cached
            if num_new > budget and not self.chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.admission_control and self.running and not self._peak_fits(req):
                break
            if swapped:
                if not self.kv.swap_in(req, num_new):
                    break
                self.swapped.remove(req)
            else:
                if not self.kv.allocate_slots(req, num_new, cached):
                    break
                req.num_computed_tokens += num_cached
                if not holds_blocks:
                    self.kv.record_prefix_lookup(req.num_tokens, num_cached)
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = num_cached
            self.policy.pop()
            self._start_running(req)
            self._schedule_tokens(req, num_new, out)
            budget -= num_new

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _expected_remaining_output(self, req: Request) -> int:
        expected_output = round(self.output_ratio * req.sampling_params.max_tokens)
        return max(0, expected_output - req.num_output_tokens)

    def _peak_fits(self, candidate: Request) -> bool:
        """Would the expected peak of KV blocks still fit if `candidate` joined the running set?

        Just before the request with o_k expected outputs left ends, each request i still alive
        (o_i >= o_k) holds ceil((a_i + o_k) / bs) blocks. With a_i = q_i*bs + r_i and o_k = Q*bs + R
        that is q_i + Q + ceil((r_i + R) / bs), the last term 0, 1 or 2 by r_i alone: a histogram of
        the alive requests' r_i makes each peak O(bs), so the check is exact and O(n*bs).
        """
        bs = self.kv.block_size
        items = sorted(((r.num_tokens, self._expected_remaining_output(r)) for r in [*self.running, candidate]),
                       key=lambda item: -item[1])
        capacity = self.kv.num_free_blocks + sum(len(r.block_ids) for r in self.running)
        sum_q, alive, residues = 0, 0, [0] * bs
        for tokens, remaining in items:  # by decreasing o: the alive set grows
            q, r = divmod(tokens, bs)
            sum_q, alive = sum_q + q, alive + 1
            residues[r] += 1
            big_q, big_r = divmod(remaining, bs)
            partial = alive - (residues[0] if big_r == 0 else 0)  # r_i + R >= 1: one more block
            spill = sum(residues[bs - big_r + 1:])  # r_i + R > bs: two more blocks
            if sum_q + alive * big_q + partial + spill > capacity:
                return False
        return True

    def _ends_with_pending_token(self, req: Request) -> bool:
        """The request's pending token will end it (max_tokens or max_model_len reached)."""
        if not req.num_pending_tokens:
            return False
        return (req.num_output_tokens + req.num_pending_tokens >= req.sampling_params.max_tokens
                or req.num_tokens_with_pending >= self.max_model_len)

    def _schedule_tokens(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        start = req.num_computed_tokens
        req.num_computed_tokens += num_new
        token_ids = req.all_token_ids[start:start + num_new]
        if len(token_ids) < num_new:  # the pending token: only the model runner knows it yet
            token_ids.append(PENDING_TOKEN)
        will_sample = req.num_computed_tokens == req.num_tokens_with_pending
        if will_sample:
            req.num_pending_tokens += 1
        params = req.sampling_params
        out.scheduled.append(ScheduledRequest(
            request_id=req.request_id,
            token_ids=token_ids,
            start_pos=start,
            block_ids=list(req.block_ids),
            will_sample=will_sample,
            is_prefill=num_new > 1 or start < req.num_prompt_tokens,
            sampling_params=params,
            generator=req.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=list(req.output_token_ids) if params.needs_output_history else [],
            grammar=req.grammar,
        ))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted_ids.append(req.request_id)
        if self.swap and self.kv.swap_out(req):
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
            self.num_swap_outs += 1
            self.policy.add_preempted(req)
            return
        # Recompute: drop the KV, keep the tokens; they are computed again on resume.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.policy.add_preempted(req)
