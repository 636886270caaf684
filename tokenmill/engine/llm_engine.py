"""LLMEngine: add_request / step / abort_request. One step = schedule -> run -> sample -> update."""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from tokenmill.config import EngineConfig
from tokenmill.core.scheduler import Scheduler, SchedulerOutput
from tokenmill.distributed.kv_transfer import make_kv_connector, parse_kv_transfer_params
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.metrics import EngineStats
from tokenmill.engine.trace import StepRecord, TraceWriter
from tokenmill.errors import ParamError
from tokenmill.models.layers.attention import get_attention_backend
from tokenmill.models.layers.cpu_ops import cpu_ops_available, load_extension
from tokenmill.models.loader import load_hf_config, load_model, resolve_model
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from tokenmill.structured_output import GrammarCache, RequestGrammar
from tokenmill.worker.kv_cache import allocate_kv_caches, kv_bytes_per_block
from tokenmill.worker.model_runner import ModelRunner

PromptType = str | list[int] | dict
logger = logging.getLogger("tokenmill.engine")


@dataclass
class _Parent:
    """A user request: its n samples are separate Requests (children) sharing one prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request] = field(default_factory=list)
    kv_transfer_params: dict | None = None  # a prefill instance's answer: where its KV can be pulled
    error: str | None = None  # why it failed (a KV pull under --kv-load-failure-policy fail)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        folder = resolve_model(config.model)
        self.hf_config = load_hf_config(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or folder)
        self.config = config = config.finalize(getattr(self.hf_config, "max_position_embeddings", 2048))
        torch.set_num_threads(config.num_threads)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = _eos_token_ids(folder, self.hf_config, self.tokenizer)

        dtype = config.torch_dtype
        backend_name = _resolve_backend(config.attention_backend)
        backend = get_attention_backend(backend_name, **(
            {"prefill": config.prefill_attention, "cascade": config.cascade_attention} if backend_name == "cpu" else {}))
        # The fused RMSNorm / SiLU x up / RoPE kernels come with the extension wherever it builds.
        ops = load_extension() if cpu_ops_available() else None
        model = load_model(folder, self.hf_config, dtype, backend, config.max_model_len, ops)
        cache_dtype = config.kv_cache_torch_dtype
        bytes_per_block = kv_bytes_per_block(self.hf_config, config.block_size, cache_dtype)
        num_blocks = config.num_kv_blocks or config.kv_cache_bytes() // bytes_per_block
        if num_blocks * config.block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {config.block_size} tokens) cannot hold one "
                f"sequence of max_model_len ({config.max_model_len}) tokens: raise kv_cache_memory "
                f"(or num_kv_blocks) or lower max_model_len")
        num_host_blocks = config.swap_space // bytes_per_block if config.preemption_mode == "swap" else 0
        self.scheduler = Scheduler.from_config(config, num_blocks, num_host_blocks)
        kv_caches = allocate_kv_caches(self.hf_config, num_blocks, config.block_size, cache_dtype)
        host_caches = allocate_kv_caches(self.hf_config, num_host_blocks, config.block_size, cache_dtype) \
            if num_host_blocks else []
        self.kv_connector = make_kv_connector(config, kv_caches)
        self.runner = ModelRunner(model, kv_caches, config.block_size, backend, config.seed, host_caches, ops,
                                  self.kv_connector)

        self._parents: dict[str, _Parent] = {}
        self._requests: dict[str, Request] = {}  # live children by id
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.num_steps = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._trace = TraceWriter(config.trace_path) if config.trace_path else None
        self._last_step_end = 0.0
        # Overlap scheduling: one model-runner thread; the batch it is computing, if any.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-runner") \
            if config.async_scheduling else None
        self._in_flight: deque[tuple[SchedulerOutput, dict[str, Request], Future, float]] = deque()
        # Structured outputs: the grammar cache (made on first use), and the requests whose grammar
        # is still compiling (held here, not in the scheduler: they take no batch slot meanwhile).
        self._grammar_cache: GrammarCache | None = None
        self._grammar_lock = threading.Lock()
        self._compiling: list[tuple[_Parent, Future]] = []
        self._failed: list[str] = []  # parents ended by a failed compile, their output not yet given

    # ---- requests in -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, tenant: str = "default",
                    kv_transfer_params: dict | None = None) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) on bad input.
        kv_transfer_params: vLLM's (prefill/decode disaggregation): keep the prompt's KV for a decode
        instance, or pull it from a prefill instance."""
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        params = self._finalize_params(sampling_params or SamplingParams(), len(token_ids))
        remote_decode, remote_prefill = self._kv_transfer(request_id, kv_transfer_params, params.n)
        child_ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        # NOTE: the children of an n > 1 request are named "{i}_{id}", which a user's id may be too:
        # _detokenizers holds every child id of every live request (finished children included).
        clash = next((c for c in child_ids if c in self._detokenizers), None)
        if clash is not None:
            raise ValueError(f"request_id {request_id!r} clashes with the live request id {clash!r} "
                             f"(the samples of an n > 1 request are named '<i>_<request_id>')")
        grammar = None if params.structured_outputs is None else self.grammar_cache.compile(params.structured_outputs)
        status = RequestStatus.WAITING if grammar is None else RequestStatus.WAITING_FOR_GRAMMAR
        parent = _Parent(request_id, text, token_ids)
        for i, child_id in enumerate(child_ids):
            child_params = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + i)
            req = Request(child_id, token_ids, child_params, prompt=text, priority=priority,
                          arrival_time=arrival_time, parent_id=request_id, index=i, tenant=tenant, status=status,
                          remote_decode=remote_decode, remote_prefill=remote_prefill)
            parent.children.append(req)
            self._requests[child_id] = req
            self._detokenizers[child_id] = IncrementalDetokenizer(
                self.tokenizer, token_ids, child_params.skip_special_tokens, child_params.stop)
        self._parents[request_id] = parent
        if grammar is None:
            self._schedule_parent(parent)
        else:
            self._compiling.append((parent, grammar))
            self._admit_compiled()

    def _schedule_parent(self, parent: _Parent) -> None:
        for i, req in enumerate(parent.children):
            # Samples after the first fork from it once its prompt is computed (shared blocks).
            self.scheduler.add_request(req, fork_of=parent.children[0] if i else None)

    @property
    def grammar_cache(self) -> GrammarCache:
        """Made on first use (xgrammar reads the whole vocabulary), by whichever thread asks first
        (the server compiles a request's grammar before it queues it)."""
        with self._grammar_lock:
            if self._grammar_cache is None:
                self._grammar_cache = GrammarCache(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids),
                                                   self.config.grammar_cache_size)
        return self._grammar_cache

    def compile_structured_outputs(self, spec: StructuredOutputsParams) -> None:
        """Compile (or find cached) the grammar of `spec`, waiting at most config.grammar_compile_timeout:
        raises ParamError (naming structured_outputs) for a bad spec or one too slow to compile."""
        self.grammar_cache.compile_now(spec, self.config.grammar_compile_timeout)

    def _admit_compiled(self) -> None:
        """Requests whose grammar has compiled join the scheduler (each sample with its own matcher);
        those whose spec failed to compile end at once (aborted, the error as their stop_reason)."""
        still = []
        for parent, future in self._compiling:
            if self._parents.get(parent.request_id) is not parent:
                continue  # aborted while compiling
            if not future.done():
                still.append((parent, future))
                continue
            error = future.exception()
            if error is not None:
                for req in parent.children:
                    req.stop_reason = str(error)
                    self._finish(req, RequestStatus.FINISHED_ABORTED)
                self._failed.append(parent.request_id)
                continue
            for req in parent.children:
                req.grammar = RequestGrammar(future.result())
            self._schedule_parent(parent)
        self._compiling = still

    def _kv_transfer(self, request_id: str, kv_transfer_params, n: int):
        """(remote_decode, remote_prefill) of a new request. Params this engine cannot act on (no or
        another KV role, n > 1, malformed) are ignored with a warning: the request runs locally."""
        if kv_transfer_params is None:
            return False, None
        connector = self.kv_connector
        try:
            remote_decode, remote_prefill = parse_kv_transfer_params(kv_transfer_params)
        except ValueError as e:
            logger.warning("request %s: %s; computing its prompt here", request_id, e)
            return False, None
        wanted = "producer" if remote_decode else "consumer" if remote_prefill else None
        if wanted is None:
            return False, None
        if connector is None or not (connector.is_producer if remote_decode else connector.is_consumer):
            logger.warning("request %s asks this engine to act as a KV %s, but --kv-role is %s; running it "
                           "locally", request_id, wanted, connector.role if connector else "not set")
            return False, None
        if n != 1:
            logger.warning("request %s: KV transfer is for n=1 requests (got n=%d); running it locally", request_id, n)
            return False, None
        return remote_decode, remote_prefill

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ParamError("prompt_token_ids", f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
                ids = list(ids)
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ParamError("prompt", "prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, list):
            text, ids = None, list(prompt)
        else:
            raise ParamError("prompt", f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise ParamError("prompt", "prompt must be a string")
            ids = self.tokenizer.encode(text) if text else []
        if not ids:
            raise ParamError("prompt", "prompt must not be empty")
        not_int = [t for t in ids if not isinstance(t, int)]
        if not_int:
            raise ParamError("prompt_token_ids", f"prompt_token_ids must be integers, got {not_int[0]!r} ({type(not_int[0]).__name__})")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ParamError("prompt_token_ids", f"prompt_token_ids contains {bad[0]!r}, outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.config.max_model_len:
            raise ParamError("prompt", f"prompt is {len(ids)} tokens long, but max_model_len is {self.config.max_model_len} "
                             f"(the prompt plus at least one generated token must fit)")
        return text, ids

    def _finalize_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ParamError("stop_token_ids", f"stop_token_ids contains {bad_stop[0]}, outside the vocabulary [0, {self.vocab_size})")
        room = self.config.max_model_len - prompt_len
        max_tokens = room if params.max_tokens is None else params.max_tokens
        return params.clone(max_tokens=max_tokens, all_stop_token_ids=frozenset(self.eos_token_ids))

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests (by the id given to add_request) at once and free their blocks."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            if rid in self.scheduler.kv_leases:  # finished on a prefill instance: end its lease
                self.kv_connector.expire_lease(rid)
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            for req in parent.children:
                if not req.is_finished:
                    self._finish(req, RequestStatus.FINISHED_ABORTED)
                self._detokenizers.pop(req.request_id, None)

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; return the outputs of the requests it advanced.

        With overlap scheduling (config.async_scheduling), batches run on the model runner's
        thread: this schedules the next batch, then returns the outputs of the oldest one in flight,
        processed while the next computes.
        """
        failed = self._take_failed()
        if self.kv_connector is not None:
            failed += self._poll_kv_transfers()
        if self._executor is None:
            t_start = time.time()
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty:
                return failed
            requests_by_id = self._mark_scheduled(scheduler_output, t_start)
            result = self.runner.execute(scheduler_output)
            return failed + self._process(scheduler_output, requests_by_id, result, t_start)
        if not self._in_flight:
            self._submit()  # start the pipeline: the batch after it is scheduled right below
        self._submit()  # schedule step N+1 while step N computes
        if not self._in_flight:
            return failed
        scheduler_output, requests_by_id, future, t_start = self._in_flight.popleft()
        outputs = failed + self._process(scheduler_output, requests_by_id, future.result(), t_start)
        if self._in_flight and not self._parents:
            # Nothing is left to serve: finish the batch in flight (its samples are dropped) so the
            # runner is idle when step() returns.
            self._in_flight.popleft()[2].result()
        return outputs

    def _take_failed(self) -> list[RequestOutput]:
        if self._compiling:
            self._admit_compiled()
        failed, self._failed = self._failed, []
        return [self._make_output(pid) for pid in failed if pid in self._parents]

    def _poll_kv_transfers(self) -> list[RequestOutput]:
        """Apply what the KV connector reports: leases to free, pulls finished. Returns the outputs of
        requests whose pull failed under --kv-load-failure-policy fail."""
        events = self.kv_connector.take_events()
        for rid in events.released:
            self.scheduler.release_lease(rid)
        outputs = []
        for rid, error in events.loaded:
            if error is not None:
                logger.warning("request %s: KV pull failed (%s); %s", rid, error,
                               "failing it" if self.config.kv_load_failure_policy == "fail" else
                               "computing its prompt here")
            req = self.scheduler.kv_load_finished(rid, error)
            if req is None:
                continue
            req.times.finished_time = time.time()
            del self._requests[rid]
            self._parents[req.parent_id].error = f"the KV transfer from the prefill instance failed: {error}"
            outputs.append(self._make_output(req.parent_id))
        return outputs

    def has_pending_kv_work(self) -> bool:
        """Blocks wait on the KV connector (leased to decode instances, or aborted requests' pulls still
        running): step() must keep running, with or without requests, to free them in time."""
        return bool(self.scheduler.kv_leases) or self.scheduler.holds_aborted_loads

    def _submit(self) -> None:
        t_start = time.time()
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.is_empty:
            requests_by_id = self._mark_scheduled(scheduler_output, t_start)
            future = self._executor.submit(self.runner.execute, scheduler_output)
            self._in_flight.append((scheduler_output, requests_by_id, future, t_start))

    def _mark_scheduled(self, scheduler_output: SchedulerOutput, t_start: float) -> dict[str, Request]:
        """The batch's requests by id (the objects: an id may be reused once its request ends)."""
        requests_by_id = {s.request_id: self._requests[s.request_id] for s in scheduler_output.scheduled}
        for req in requests_by_id.values():
            if req.times.first_scheduled_time is None:
                req.times.first_scheduled_time = t_start
                self._num_prompt_tokens += req.num_prompt_tokens
        return requests_by_id

    def _process(self, scheduler_output: SchedulerOutput, requests_by_id: dict[str, Request], result,
                 t_start: float) -> list[RequestOutput]:
        """Append the sampled tokens, check stops, finish requests; the outputs of those advanced."""
        now = time.time()
        touched: dict[str, None] = {}
        finished: list[str] = []
        for rid, (first, entries) in (result.prompt_logprobs or {}).items():
            req = requests_by_id[rid]
            known = len(req.prompt_logprobs)  # a recomputed (preempted) prompt scores its tokens again
            req.prompt_logprobs.extend(entries[known - first:] if known >= first else [])
        for rid, (token, logprobs) in result.sampled.items():
            req = requests_by_id[rid]
            if req.is_finished:  # a stop was seen in the previous batch's output, or aborted since
                continue
            self.scheduler.append_token(req, token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs)
            if req.times.first_token_time is None:
                req.times.first_token_time = now
            req.times.last_token_time = now
            status = self._check_stop(req, token, rid in result.grammar_done)
            if status is not None:
                self._finish(req, status, now)
                finished.append(rid)
            touched[req.parent_id] = None
            self._num_generation_tokens += 1
        self.num_steps += 1
        if self.config.log_steps or self._trace is not None:
            self._record_step(scheduler_output, t_start, finished)
        return [self._make_output(pid) for pid in touched if self._yields_output(pid)]

    def _yields_output(self, parent_id: str) -> bool:
        parent = self._parents[parent_id]
        return (parent.children[0].sampling_params.output_kind is not RequestOutputKind.FINAL_ONLY
                or all(req.is_finished for req in parent.children))

    def _record_step(self, scheduler_output: SchedulerOutput, t_start: float, finished: list[str]) -> None:
        # With overlap, a batch is scheduled while the previous one runs: its step starts where
        # that one's ended, so the steps tile the timeline.
        t_start = max(t_start, self._last_step_end)
        self._last_step_end = time.time()
        record = StepRecord.of_step(self.num_steps, t_start, self._last_step_end, scheduler_output, finished)
        if self.config.log_steps:
            print(record.format(), file=sys.stderr, flush=True)
        if self._trace is not None:
            self._trace.write(record)

    def _check_stop(self, req: Request, token: int, grammar_done: bool = False) -> RequestStatus | None:
        p = req.sampling_params
        if grammar_done:
            # The grammar reached its end: the token is its stop token (left out of the text), or
            # one it rejected (only possible when nothing it allows could be sampled).
            req.stop_reason = None if token in req.grammar.matcher.stop_token_ids else "grammar"
            return RequestStatus.FINISHED_STOPPED
        min_reached = req.num_output_tokens >= p.min_tokens
        if min_reached:
            # A stop token (EOS or stop_token_ids) ends the request; its text is left out (as vLLM).
            if not p.ignore_eos and token in p.all_stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        stop_str = self._detokenizers[req.request_id].add_token(token, check_stop=min_reached)
        if stop_str is not None:
            req.stop_reason = stop_str
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus, now: float | None = None) -> None:
        req.times.finished_time = now if now is not None else time.time()
        if self.scheduler.finish_request(req, status):  # a prefill instance keeps the blocks for a pull
            self._parents[req.parent_id].kv_transfer_params = self.kv_connector.add_lease(
                req.request_id, req.block_ids)
        del self._requests[req.request_id]

    def _make_output(self, parent_id: str) -> RequestOutput:
        parent = self._parents[parent_id]
        outputs = []
        for req in parent.children:
            detok = self._detokenizers[req.request_id]
            want_logprobs = req.sampling_params.logprobs is not None
            outputs.append(CompletionOutput(
                index=req.index, text=detok.text, token_ids=list(req.output_token_ids),
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=list(req.output_logprobs) if want_logprobs else None,
                cumulative_logprob=(sum(lp[t] for lp, t in zip(req.output_logprobs, req.output_token_ids))
                                    if want_logprobs else None)))
        finished = all(req.is_finished for req in parent.children)
        if finished:
            del self._parents[parent_id]
            for req in parent.children:
                self._detokenizers.pop(req.request_id, None)
        leader = parent.children[0]
        prompt_logprobs = list(leader.prompt_logprobs) if leader.sampling_params.prompt_logprobs is not None else None
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                             RequestMetrics.of(parent.children), prompt_logprobs, parent.children[0].num_cached_tokens,
                             parent.kv_transfer_params, parent.error)

    # ---- state -------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.make_stats().num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.scheduler.make_stats().num_used_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.make_stats().num_total_blocks

    def stats(self) -> EngineStats:
        """The scheduler's snapshot (queues, KV blocks, prefix hits, preemptions) and the engine's token
        counters."""
        return EngineStats(scheduler=self.scheduler.make_stats(), prompt_tokens=self._num_prompt_tokens,
                           generation_tokens=self._num_generation_tokens, num_steps=self.num_steps,
                           kv_transfer=self.kv_connector.stats() if self.kv_connector is not None else None)

    def close(self) -> None:
        while self._in_flight:
            self._in_flight.popleft()[2].result()
        if self._executor is not None:
            self._executor.shutdown()
        if self._grammar_cache is not None:
            self._grammar_cache.close()
        if self.kv_connector is not None:
            self.kv_connector.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def get_tokenizer(self):
        return self.tokenizer

    def check_integrity(self) -> None:
        """Raise AssertionError if block accounting is off (and, when idle, if any block is used)."""
        self.scheduler.check_integrity()
        held = self.scheduler.kv_leases or self.scheduler.holds_aborted_loads  # freed by the KV connector
        if not self.has_unfinished_requests() and self.num_used_blocks and not held:
            raise AssertionError(f"no live request, but {self.num_used_blocks} blocks are still used")


def _resolve_backend(name: str) -> str:
    """"auto" is the C++ kernel where it builds (a C++ compiler is needed once), else plain PyTorch."""
    if name != "auto":
        return name
    return "cpu" if cpu_ops_available() else "torch"


def _eos_token_ids(folder, hf_config, tokenizer) -> set[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(folder)
        eos = gen.eos_token_id
    except OSError:
        eos = getattr(hf_config, "eos_token_id", None)
    for value in [eos, tokenizer.eos_token_id]:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids
