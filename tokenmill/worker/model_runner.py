"""ModelRunner: SchedulerOutput -> flat input tensors -> model -> sampler -> one token per sampler.

    request        A: 5 new tokens (prompt chunk)   B: 1 (decode)   C: 3 (last chunk)
    input_ids      [a0 a1 a2 a3 a4 | b7 | c4 c5 c6]              (no padding between requests)
    positions      [ 0  1  2  3  4 |  7 |  4  5  6]
    query_start_loc [0, 5, 6, 9]
    logits rows    [6, 9]  -> only B and C sample this step (A has more prompt to go)
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from tokenmill.core.scheduler import PENDING_TOKEN, ScheduledRequest, SchedulerOutput
from tokenmill.distributed.kv_transfer.base import KVConnector
from tokenmill.models.layers.attention import AttentionBackend, AttentionInputs
from tokenmill.worker.sampler import Sampler, SamplingRow


@dataclass
class ModelRunnerOutput:
    # request_id -> (sampled token, its logprobs dict or None); only requests that sampled.
    sampled: dict[str, tuple[int, dict[int, float] | None]]
    # requests whose grammar reached its end with this step's token (finish them: "stop")
    grammar_done: frozenset[str] = frozenset()
    # request_id -> (position of the first prompt token scored, one {token: logprob} per position):
    # the logprobs of the prompt tokens this step's chunk predicts (SamplingParams.prompt_logprobs)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 backend: AttentionBackend, seed: int, host_caches: list[torch.Tensor] = (),
                 ops: ModuleType | None = None, kv_connector: KVConnector | None = None) -> None:
        self.model = model
        self.kv_connector = kv_connector  # starts the KV pulls the scheduler asks for
        self.kv_caches = kv_caches
        self.host_caches = list(host_caches)  # swap space: same layout, in host memory
        self.block_size = block_size
        self.backend = backend
        self.sampler = Sampler(seed, ops)
        # The previous step's samples: a request's pending token (PENDING_TOKEN in its token_ids)
        # is the one it sampled there (the engine may not have seen it yet).
        self._last_sampled: dict[str, int] = {}

    def _copy_blocks(self, sched: SchedulerOutput) -> None:
        # Order matters: a block swapped out may be reused in the same step as a swap-in or copy target.
        for pairs, src_caches, dst_caches in ((sched.blocks_to_swap_out, self.kv_caches, self.host_caches),
                                              (sched.blocks_to_swap_in, self.host_caches, self.kv_caches),
                                              (sched.blocks_to_copy, self.kv_caches, self.kv_caches)):
            if not pairs:
                continue
            src = torch.tensor([p[0] for p in pairs])
            dst = torch.tensor([p[1] for p in pairs])
            for s_cache, d_cache in zip(src_caches, dst_caches):
                d_cache[:, dst] = s_cache[:, src]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.has_block_ops:
            self._copy_blocks(sched)
        for load in sched.kv_loads:  # into blocks no batch touches until the pull has ended
            self.kv_connector.start_load(load)
        reqs = sched.scheduled
        if not reqs:
            return ModelRunnerOutput({})
        bs = self.block_size
        last = self._last_sampled
        pending = {r.request_id: last[r.request_id] for r in reqs if r.token_ids[-1] == PENDING_TOKEN}
        n = len(reqs)
        input_ids = np.fromiter((t for r in reqs for t in r.token_ids), dtype=np.int64)
        lens = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=n)
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start_loc[1:])
        if pending:
            for i, r in enumerate(reqs):
                if r.request_id in pending:
                    input_ids[query_start_loc[i + 1] - 1] = pending[r.request_id]
        starts = np.fromiter((r.start_pos for r in reqs), dtype=np.int64, count=n)
        # Token t of request i sits at position starts[i] + (t - query_start_loc[i]).
        positions = np.arange(len(input_ids), dtype=np.int64) + np.repeat(starts - query_start_loc[:-1], lens)
        num_blocks = np.fromiter((len(r.block_ids) for r in reqs), dtype=np.int64, count=n)
        block_tables = np.zeros((n, int(num_blocks.max())), dtype=np.int64)
        block_tables[np.arange(block_tables.shape[1]) < num_blocks[:, None]] = np.fromiter(
            (b for r in reqs for b in r.block_ids), dtype=np.int64, count=int(num_blocks.sum()))
        req_of_token = np.repeat(np.arange(n), lens)
        slot_mapping = block_tables[req_of_token, positions // bs] * bs + positions % bs

        sampling = [i for i, r in enumerate(reqs) if r.will_sample]
        logits_indices = torch.from_numpy(query_start_loc[1:][sampling] - 1)
        # Prompt logprobs: the rows of a chunk whose next token is a prompt token, after the samplers'.
        scored = [(i, r.start_pos + 1, min(r.start_pos + r.num_tokens + 1, len(r.prompt_token_ids)))
                  for i, r in enumerate(reqs) if r.sampling_params.prompt_logprobs is not None
                  and r.start_pos + 1 < len(r.prompt_token_ids)]
        if scored:
            rows = [np.arange(query_start_loc[i], query_start_loc[i] + (end - first)) for i, first, end in scored]
            logits_indices = torch.cat([logits_indices, torch.from_numpy(np.concatenate(rows))])
        attn_inputs = AttentionInputs(
            slot_mapping=torch.from_numpy(slot_mapping),
            query_start_loc=query_start_loc.tolist(),
            seq_lens=(starts + lens).tolist(),
            block_tables=torch.from_numpy(block_tables),
            block_size=bs,
        )
        metadata = self.backend.prepare(attn_inputs)
        logits = self.model(torch.from_numpy(input_ids), torch.from_numpy(positions), self.kv_caches,
                            metadata, logits_indices)
        prompt_logprobs = None
        if scored:
            prompt_logprobs = _prompt_logprobs(logits[len(sampling):], reqs, scored)
            logits = logits[:len(sampling)]
        if not sampling:
            self._last_sampled = {}
            return ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs)
        rows = [SamplingRow(reqs[i].sampling_params, reqs[i].generator, reqs[i].prompt_token_ids,
                            _history(reqs[i], pending), reqs[i].grammar) for i in sampling]
        out = self.sampler(logits, rows)
        self._last_sampled = {reqs[i].request_id: tok for i, tok in zip(sampling, out.token_ids)}
        return ModelRunnerOutput({reqs[i].request_id: (tok, lp) for i, tok, lp
                                  in zip(sampling, out.token_ids, out.logprobs)},
                                 frozenset(reqs[sampling[j]].request_id for j in out.grammar_done),
                                 prompt_logprobs)


def _prompt_logprobs(logits: torch.Tensor, reqs: list[ScheduledRequest],
                     scored: list[tuple[int, int, int]]) -> dict[str, tuple[int, list[dict[int, float]]]]:
    """Each scored request's prompt tokens first..end-1: logprob (float32) and its top n."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out, row = {}, 0
    for i, first, end in scored:
        r = reqs[i]
        n = r.sampling_params.prompt_logprobs
        targets = r.prompt_token_ids[first:end]
        block = logprobs[row:row + len(targets)]
        row += len(targets)
        own = block.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        top_vals, top_ids = block.topk(n, dim=-1) if n else (None, None)
        entries = []
        for j, (tok, lp) in enumerate(zip(targets, own)):
            entry = {tok: lp}
            if n:
                for tid, val in zip(top_ids[j].tolist(), top_vals[j].tolist()):
                    entry.setdefault(tid, val)
            entries.append(entry)
        out[r.request_id] = (first, entries)
    return out


def _history(req: ScheduledRequest, pending: dict[str, int]) -> list[int]:
    """The outputs the sampler sees: those known at scheduling time, then the pending one."""
    if req.request_id in pending and req.sampling_params.needs_output_history:
        return [*req.output_token_ids, pending[req.request_id]]
    return req.output_token_ids
