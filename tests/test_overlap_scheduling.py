"""Overlap scheduling (async_scheduling): step N+1 is scheduled, with its inputs' last token still
pending, while step N computes. Everything a request sees must be exactly as without overlap:
tokens under every sampling option, stops found one step late (their extra work dropped),
preemption, aborts and reused request ids, and the block accounting after each scenario.
"""
from __future__ import annotations


import pytest
import torch
from transformers import AutoConfig
from helpers import TokenIds

from tokenmill import LLM, SamplingParams
from tokenmill.worker.kv_cache import kv_bytes_per_block

MAX_LEN = 256
ids = TokenIds(7)


def make_llm(model_dir, async_scheduling: bool, num_kv_blocks: int = 64, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", max_model_len=MAX_LEN, num_kv_blocks=num_kv_blocks,
               async_scheduling=async_scheduling, **kw)


@pytest.fixture(scope="module")
def sync_llm(tiny_llama_dir) -> LLM:
    return make_llm(tiny_llama_dir, async_scheduling=False)


@pytest.fixture(scope="module")
def async_llm(tiny_llama_dir) -> LLM:
    return make_llm(tiny_llama_dir, async_scheduling=True)


def summary(outputs) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [sorted(lp) for lp in c.logprobs]) for c in o.outputs]
            for o in outputs]


def mixed_requests(sync_llm: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy, seeded sampling, penalties, min_tokens, logprobs, n > 1, and stops that fire
    (a stop token and a stop string taken from a clean greedy run)."""
    prompts = [ids(n) for n in (5, 40, 17, 90, 33, 8, 61, 24, 12, 20)]
    ref = sync_llm.generate([{"prompt_token_ids": prompts[0]}],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_token = ref.outputs[0].token_ids[4]
    stop_text = sync_llm.get_tokenizer().decode(ref.outputs[0].token_ids[6:8])
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=30,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, presence_penalty=1.0, seed=11, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, stop=[stop_text], ignore_eos=True),
        SamplingParams(temperature=0.7, n=3, seed=5, max_tokens=10, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, min_tokens=9, max_tokens=9, ignore_eos=True, repetition_penalty=1.1),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        # Negative penalties make each token follow from the newest ones: the pending token must be
        # in the history the sampler sees.
        SamplingParams(temperature=0, presence_penalty=-2.0, frequency_penalty=-2.0, max_tokens=15, ignore_eos=True),
    ]
    prompts[5] = prompts[0]  # the stop string appears in this prompt's greedy output
    return prompts, params


def generate(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.llm_engine.check_integrity()
    return outs


def test_same_outputs_with_and_without_overlap(sync_llm, async_llm):
    prompts, params = mixed_requests(sync_llm)
    expected = generate(sync_llm, prompts, params)
    got = generate(async_llm, prompts, params)
    assert summary(got) == summary(expected)
    # The stops did fire, before max_tokens: a late-seen stop must not leak an extra token.
    stopped = expected[0].outputs[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == stopped.token_ids.index(
        params[0].stop_token_ids[0]) + 1 <= 5
    assert expected[5].outputs[0].finish_reason == "stop"
    assert async_llm.llm_engine.num_used_blocks == 0


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_same_outputs_under_preemption(tiny_llama_dir, sync_llm, preemption_mode):
    prompts = [ids(n) for n in (70, 50, 90, 30, 60, 45)]
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, repetition_penalty=1.2)
              if i % 2 else SamplingParams(temperature=0.9, seed=i, max_tokens=50, ignore_eos=True)
              for i in range(len(prompts))]
    expected = generate(sync_llm, prompts, params)
    tight = make_llm(tiny_llama_dir, async_scheduling=True, num_kv_blocks=20, preemption_mode=preemption_mode,
                     enable_admission_control=False, swap_space=8 * kv_bytes_per_block(
                         AutoConfig.from_pretrained(tiny_llama_dir), 16, torch.float32))
    got = generate(tight, prompts, params)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert summary(got) == summary(expected)
    assert tight.llm_engine.num_used_blocks == 0


def test_step_api_with_stops_aborts_and_reused_ids(sync_llm, async_llm):
    engine = async_llm.llm_engine
    prompt = ids(20)
    ref = sync_llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    other = ids(30)
    ref_other = sync_llm.generate([{"prompt_token_ids": other}],
                                  SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                  use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("x", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10,
                                                                          stop_token_ids=[ref[2]]))
    engine.add_request("y", {"prompt_token_ids": other}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    finished = {}
    reused = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            engine.check_integrity()
            if out.finished:
                finished.setdefault(out.request_id, []).append(out.outputs[0])
        if "x" in finished and not reused:
            # "x" stopped, and a batch holding its next (dropped) step may be in flight: reuse the id.
            engine.add_request("x", {"prompt_token_ids": other},
                               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            reused = True
            engine.abort_request("y")
    first, second = finished["x"]
    assert first.token_ids == ref[:ref.index(ref[2]) + 1] and first.finish_reason == "stop"
    assert second.token_ids == ref_other and second.finish_reason == "length"
    assert "y" not in finished  # aborted: no final output from the engine
    assert engine.num_used_blocks == 0 and not engine._in_flight
