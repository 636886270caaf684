"""What the engine hands back: RequestOutput holding one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.request import Request, RequestTimes


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # One dict per generated token: {token_id: logprob} for the sampled token and the top ones.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics(RequestTimes):
    """A user request's timestamps and latencies (RequestTimes) and what it cost."""
    num_preemptions: int = 0
    num_generation_tokens: int = 0  # tokens of its longest sample so far

    @classmethod
    def of(cls, requests: list[Request]) -> "RequestMetrics":
        """The figures of one user request from its samples (n > 1: one Request each): the earliest
        arrival, first scheduling and first token, the latest last token, and the latest finish once
        all have finished."""
        def first(values):
            values = [v for v in values if v is not None]
            return min(values) if values else None

        times = [r.times for r in requests]
        done = all(t.finished_time is not None for t in times)
        return cls(
            arrival_time=min(t.arrival_time for t in times),
            first_scheduled_time=first(t.first_scheduled_time for t in times),
            first_token_time=first(t.first_token_time for t in times),
            last_token_time=max((t.last_token_time for t in times if t.last_token_time), default=None),
            finished_time=max(t.finished_time for t in times) if done else None,
            num_preemptions=sum(r.num_preemptions for r in requests),
            num_generation_tokens=max(r.num_output_tokens for r in requests),
        )

    @property
    def time_per_output_token(self) -> float | None:
        """Mean inter-token latency after the first token (vLLM's TPOT); None below two tokens."""
        if self.first_token_time is None or self.last_token_time is None or self.num_generation_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generation_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then one dict per token
    # ({token_id: logprob}: the prompt's own token and the top ones), complete once the prompt is.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int | None = None  # prompt tokens not computed here (prefix-cache hits, loaded KV)
    kv_transfer_params: dict | None = None  # a prefill instance's: where a decode instance pulls the KV
    error: str | None = None  # set when the request failed (finish_reason "abort") for this reason
