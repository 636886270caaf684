"""Batched sampling with per-request parameters.

Order of operations on each row's logits (as vLLM): a structured-output row's grammar masks every
token it does not allow next (xgrammar's bitmask, on float32 logits); min_tokens masks the stop
tokens (not on a grammar row: there the grammar decides where the output ends); repetition,
presence and frequency penalties; then greedy rows take the argmax, and the others are divided by
their temperature, cut by top-k, top-p and min-p, and sampled. Sampling draws exponential noise
E and takes argmax(p / E), which picks token i with probability p_i; a seeded request draws its
noise from its own generator, so its tokens don't depend on the rest of the batch.

Logprobs are those of the raw model distribution (before penalties and temperature), as vLLM's
default: the sampled token's plus the `logprobs` most likely ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output import RequestGrammar, apply_grammars


@dataclass
class SamplingRow:
    """What the sampler needs of one request that samples this step."""
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: RequestGrammar | None = None  # structured outputs: advanced by the token sampled here

    @property
    def constrained(self) -> bool:
        return self.grammar is not None and not self.grammar.done


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    grammar_done: list[int] = field(default_factory=list)  # rows whose grammar reached its end


class Sampler:
    def __init__(self, seed: int, ops: ModuleType | None = None) -> None:
        """ops: tokenmill's CPU extension, whose argmax reads bfloat16 rows without widening them."""
        self.generator = torch.Generator().manual_seed(seed)
        self.ops = ops

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and logits.device.type == "cpu" and logits.dim() == 2 and logits.stride(1) == 1:
            return self.ops.argmax(logits)
        return logits.argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [len(rows), vocab] in the model's dtype. Plain greedy rows take the argmax as
        they are (widening is exact, so the winner is the same); only the rows that are adjusted,
        sampled or asked for logprobs are widened to float32, and only those rows."""
        tokens = self._argmax(logits)
        adjusted = [i for i, r in enumerate(rows) if _is_adjusted(r)]
        if adjusted:
            idx = torch.tensor(adjusted)
            tokens[idx] = self._sample(logits[idx].float(), [rows[i] for i in adjusted])
        token_list = tokens.tolist()
        # After sampling, each matcher accepts its row's token (the next step's mask starts there).
        grammar_done = [i for i, r in enumerate(rows) if r.constrained and r.grammar.accept(token_list[i])]
        return SamplerOutput(token_list, _gather_logprobs(logits, token_list, rows), grammar_done)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits: a float32 copy of the rows' logits, adjusted in place."""
        if any(r.constrained for r in rows):
            apply_grammars(logits, [r.grammar if r.constrained else None for r in rows])
        _mask_stop_tokens_before_min(logits, rows)
        _apply_penalties(logits, rows)
        greedy = torch.tensor([r.params.greedy for r in rows])
        tokens = self._argmax(logits)
        if greedy.all():
            return tokens
        idx = (~greedy).nonzero().flatten()
        sub_rows = [rows[i] for i in idx.tolist()]
        probs = _truncated_probs(logits[idx], sub_rows)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for j, r in enumerate(sub_rows):
            if r.generator is not None:
                noise[j] = torch.empty(probs.shape[1]).exponential_(generator=r.generator)
        tokens[idx] = (probs / noise).argmax(dim=-1)
        return tokens


def _is_adjusted(r: SamplingRow) -> bool:
    """Whether the row's logits change before its token is picked (penalties, min_tokens, sampling)."""
    p = r.params
    return not p.greedy or p.has_penalties or len(r.output_token_ids) < p.min_tokens or r.constrained


def _mask_stop_tokens_before_min(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) < p.min_tokens and not r.constrained:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(p.all_stop_token_ids))
            if stop_ids:
                logits[i, list(stop_ids)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue
        out = torch.tensor(r.output_token_ids, dtype=torch.long)
        out = out[out < vocab]
        if p.repetition_penalty != 1.0:
            # Prompt and output tokens alike (vLLM / HF): shrink positive logits, grow negative ones.
            seen = torch.tensor(r.prompt_token_ids + r.output_token_ids, dtype=torch.long).unique()
            seen = seen[seen < vocab]
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.zeros(vocab).index_add_(0, out, torch.ones(len(out)))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _truncated_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    temperature = torch.tensor([r.params.temperature for r in rows]).unsqueeze(1)
    logits = logits / temperature
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        vocab = logits.shape[1]
        k = torch.tensor([kk if kk > 0 else vocab for kk in top_k]).clamp(max=vocab)
        drop |= torch.arange(vocab)[None, :] >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        # Top-p over what top-k kept: keep the smallest prefix whose mass reaches p (always >= 1 token).
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p_t = torch.tensor(top_p)[:, None]
        drop |= (mass_before >= top_p_t) & (top_p_t < 1.0)  # p == 1 keeps all (no rounding cuts)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if any(m > 0 for m in min_p):
        threshold = torch.tensor(min_p)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _gather_logprobs(logits: torch.Tensor, tokens: list[int],
                     rows: list[SamplingRow]) -> list[dict[int, float] | None]:
    """The raw model distribution's logprobs (float32) of each asking row: its token's and its top n."""
    out: list[dict[int, float] | None] = [None] * len(rows)
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asking:
        return out
    raw = torch.log_softmax(logits[torch.tensor(asking)].float(), dim=-1)
    for j, i in enumerate(asking):
        n = rows[i].params.logprobs
        entry = {tokens[i]: raw[j, tokens[i]].item()}
        if n > 0:
            vals, ids = raw[j].topk(n)
            for tid, val in zip(ids.tolist(), vals.tolist()):
                entry.setdefault(tid, val)
        out[i] = entry
    return out
