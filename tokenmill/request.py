"""Request: one sequence being generated, and the one counter that tracks its progress.

Glossary (one meaning per name, used everywhere):
  num_tokens           prompt tokens + output tokens known so far (len(all_token_ids)).
  num_computed_tokens  tokens whose K/V are in the cache. A prompt chunk, a prefix-cache hit and a
                       decode step all just advance it; the request samples a new token in a step
                       that brings it up to num_tokens + num_pending_tokens.
  num_pending_tokens   tokens sampled by steps whose output the engine has not yet processed. With
                       overlap scheduling step N+1 is scheduled before step N's output is seen,
                       and feeds step N's sample (pending, unknown to Python) as its input; while
                       N+1 runs, both its sample and N's are pending (at most 2).
  block_ids            the request's block table (logical block i -> physical block id), owned and
                       changed only by the KVCacheManager (as are block_hashes,
                       num_registered_blocks and swapped_block_ids).

One writer per field: the Scheduler alone changes num_computed_tokens, num_pending_tokens, status,
num_cached_tokens, num_loading_tokens, remote_prefill and num_preemptions (and, through append_token, the token lists); the KVCacheManager only the
block fields above, reporting what it found (cached blocks) for the scheduler to count.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from tokenmill.distributed.kv_transfer.params import RemotePrefill
from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its structured-output grammar is compiling (engine-held)
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # its prompt's KV is being pulled from a prefill instance
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV copied to host memory
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestTimes:
    """Timestamps of a request's life (time.time(); virtual seconds in the simulator), None until
    reached, and the latencies between them, in seconds."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 *, prompt: str | None = None, priority: int = 0, arrival_time: float | None = None,
                 parent_id: str | None = None, index: int = 0, tenant: str = "default",
                 status: RequestStatus = RequestStatus.WAITING, remote_decode: bool = False,
                 remote_prefill: RemotePrefill | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index  # which of the parent's n samples this is
        self.tenant = tenant  # the client it came for (fair scheduling)

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] = [None]  # with params.prompt_logprobs
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # content hashes of its full blocks (prefix caching)
        self.num_registered_blocks = 0  # leading blocks already entered in the prefix cache
        self.swapped_block_ids: list[int] = []  # host blocks holding its KV while SWAPPED
        self.status = status
        # Its structured-output matcher (a RequestGrammar), set once compiled, before it is scheduled.
        self.grammar = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Prompt tokens whose KV was not computed here at first admission (prefix-cache hits, and KV
        # loaded from a prefill instance): usage.prompt_tokens_details.cached_tokens. None until admitted.
        self.num_cached_tokens: int | None = None
        # Prefill/decode disaggregation: keep the prompt's blocks for a decode instance when done
        # (remote_decode), or pull them from a prefill instance first (remote_prefill, cleared by the
        # scheduler once pulled or given up). num_loading_tokens: tokens whose KV is being written into
        # its blocks by a pull (they hold blocks but are not computed yet).
        self.remote_decode = remote_decode
        self.remote_prefill = remote_prefill
        self.num_loading_tokens = 0
        self.times = RequestTimes(arrival_time if arrival_time is not None else time.time())

        # NOTE: one generator per seeded request, advanced only by this request's own draws, so a
        # seed gives the same tokens whatever else shares the batch (and across preemptions).
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    def append_token(self, token_id: int) -> None:
        """A sampled token joins the request's tokens (Scheduler.append_token calls it, and settles
        num_pending_tokens)."""
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
