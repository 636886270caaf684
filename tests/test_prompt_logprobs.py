"""prompt_logprobs against transformers in float32: every prompt token's logprob and top ones, with
chunked prefill, n > 1, preemption and a prefix already cached."""
from __future__ import annotations

import pytest
import torch
from helpers import TokenIds

from tokenmill import LLM, SamplingParams

ids = TokenIds(131)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row p: the distribution of token p + 1


def check(out, model, top: int) -> None:
    prompt = out.prompt_token_ids
    ref = hf_prompt_logprobs(model, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert entry[prompt[p]] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=2e-5)
        top_ids = ref[p - 1].topk(top).indices.tolist()
        assert set(top_ids) <= set(entry) and len(entry) <= top + 1
        for t in top_ids:
            assert entry[t] == pytest.approx(ref[p - 1, t].item(), abs=2e-5)


@pytest.mark.parametrize("budget", [512, 8])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, hf_model, budget):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, max_num_batched_tokens=budget,
              num_kv_blocks=64)
    prompts = [ids(n) for n in (2, 17, 40)]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k) for k in (0, 3, 5)],
                        use_tqdm=False)
    for out, k in zip(outs, (0, 3, 5)):
        check(out, hf_model, k)
    # A cached prefix is not skipped for a request that wants its logprobs; n > 1 scores it once.
    again = llm.generate(prompts[2], SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=2),
                         use_tqdm=False)[0]
    check(again, hf_model, 2)
    assert llm.generate(prompts[2], SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt_logprobs is None
    assert llm.llm_engine.num_used_blocks == 0


def test_prompt_logprobs_survive_preemption(tiny_llama_dir, hf_model):
    tight = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=128, num_kv_blocks=10,
                enable_admission_control=False, max_num_batched_tokens=32)
    prompts = [ids(n) for n in (60, 50, 45)]
    outs = tight.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
                          use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    for out in outs:
        check(out, hf_model, 1)
