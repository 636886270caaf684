"""bfloat16 stays close to transformers' bfloat16 run.

bfloat16 rounds every intermediate to 8 bits of mantissa, and tokenmill's kernels (fused QKV and
gate-up GEMMs, the C++ attention's float32 online softmax, the fused norms) round at other places
than transformers' eager bfloat16 path, so greedy tokens may part ways after a while. What must
hold: up to the first token where they differ the two runs agree, and at that step each run's
token is among the other's 5 most likely ones (tokenmill's top-5 logprobs, transformers' top-5
logits) -- a near tie, not a broken model.
"""
from __future__ import annotations

import random

import pytest
import torch
from helpers import hf_greedy_top5

from tokenmill import LLM, SamplingParams

PROMPTS = [
    "The history of the Roman Empire is long and complicated. It began when Augustus became the first emperor, and",
    "In computer science, a hash table is a data structure that maps keys to values. To look up a key, it",
    "Photosynthesis is the process by which green plants, algae and some bacteria use the energy of sunlight to",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
MAX_TOKENS = 24


def _check_close(ours: list[int], our_logprobs: list[dict[int, float]], theirs: list[int],
                 their_top5: list[list[int]], label: str) -> int:
    """Compare up to the first difference; returns how many tokens agreed."""
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            our_top5 = sorted(our_logprobs[j], key=our_logprobs[j].get, reverse=True)[:5]
            assert a in their_top5[j], f"{label}: step {j}: our token {a} is not in transformers' top 5 {their_top5[j]}"
            assert b in our_top5, f"{label}: step {j}: transformers' token {b} is not in our top 5 {our_top5}"
            return j
    return len(ours)


@pytest.mark.parametrize("name", ["tiny_llama_dir", "default_model_dir"])
def test_bfloat16_close_to_transformers(request, name):
    model_dir = request.getfixturevalue(name)
    llm = LLM(str(model_dir), dtype="bfloat16", max_model_len=256)
    assert llm.llm_engine.config.torch_dtype == torch.bfloat16
    if name == "default_model_dir":
        prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    else:
        rng = random.Random(5)
        prompts = [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 40, 120, 17)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    agreed = []
    for i, (out, p) in enumerate(zip(outputs, prompts)):
        tokens, top5 = hf_greedy_top5(model_dir, p, MAX_TOKENS, dtype=torch.bfloat16)
        completion = out.outputs[0]
        assert len(completion.token_ids) == MAX_TOKENS
        agreed.append(_check_close(completion.token_ids, completion.logprobs, tokens, top5, f"prompt {i}"))
    # Not a vacuous pass: the runs track each other for a good stretch before any near tie (the
    # message shows how long, per prompt).
    assert max(agreed) >= MAX_TOKENS // 2, f"tokens agreed per prompt: {agreed}"
    assert llm.llm_engine.num_used_blocks == 0
