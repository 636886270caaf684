"""Greedy float32 parity with Hugging Face transformers: token for token, whatever the scheduling.

The reference is `AutoModelForCausalLM.generate(do_sample=False)` run on one prompt at a time (no
padding) on the same folder; our engine must produce the same tokens for every prompt whether it
runs alone, in a mixed batch, prefilled in small chunks, without chunking, or preempted and
recomputed. The tiny random models get token-id prompts with ignore_eos (their EOS is meaningless),
the real SmolLM2-135M-Instruct gets text prompts and stops at its EOS as usual.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import hf_greedy

from tokenmill import LLM, SamplingParams
from tokenmill.worker.kv_cache import kv_bytes_per_block

# ---- the cases -------------------------------------------------------------------------------------

TINY_LENS = [5, 17, 300, 31, 64, 150, 100, 211]  # not sorted: long and short prompts interleave
TINY_MAX_TOKENS = [24, 7, 12, 32, 1, 20, 16, 3]

# Each at least 17 tokens long, so a 16-token budget splits every one of them.
REAL_PROMPTS = [
    "The history of the Roman Empire is long and complicated. It began when Augustus became the first emperor, and",
    "Here is a short recipe for a simple tomato soup that anyone can cook at home in under thirty minutes:",
    "In computer science, a hash table is a data structure that maps keys to values. To look up a key, it",
    "Once upon a time, in a small village at the edge of a great dark forest, there lived an old woodcutter who",
    "Photosynthesis is the process by which green plants, algae and some bacteria use the energy of sunlight to",
    "My grandmother always told me that the three most important things to remember when learning a new language are",
    # The chat template's rendering: the answer is short and ends with the EOS token <|im_end|>.
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
REAL_MAX_TOKENS = [32, 20, 28, 32, 12, 24, 16]


def tiny_prompts(n_lens: list[int]) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(100, 49000) for _ in range(n)] for n in n_lens]


def _case(model_dir: Path, prompts, max_tokens: list[int], ignore_eos: bool, **engine_args):
    """Run the prompts in one batch; compare every output with HF; check the engine is clean."""
    llm = LLM(str(model_dir), dtype="float32", **engine_args)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=ignore_eos) for k in max_tokens]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    engine.check_integrity()
    assert engine.num_used_blocks == 0
    assert not engine.has_unfinished_requests()
    assert len(outputs) == len(prompts)
    for i, (prompt, out, k) in enumerate(zip(prompts, outputs, max_tokens)):
        if isinstance(prompt, dict):
            assert out.prompt_token_ids == prompt["prompt_token_ids"]
        else:
            assert out.prompt_token_ids == engine.tokenizer.encode(prompt)
        expected = hf_greedy(model_dir, out.prompt_token_ids, k, ignore_eos)
        got = out.outputs[0].token_ids
        assert got == expected, (
            f"prompt {i} ({len(out.prompt_token_ids)} tokens): first difference at output token "
            f"{next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))}"
            f"\n  ours: {got}\n  HF:   {expected}")
        assert out.finished
        stopped = not ignore_eos and got[-1] in engine.eos_token_ids
        assert len(got) == k or stopped
        assert out.outputs[0].finish_reason == ("stop" if stopped else "length")
    if not ignore_eos:  # the batch includes the chat prompt, so the EOS stop path is exercised
        assert any(o.outputs[0].finish_reason == "stop" for o in outputs) or len(prompts) == 1
    return llm, outputs


MODELS = ["tiny_llama_dir", "tiny_qwen2_dir", "default_model_dir"]


def _setup(request, name: str):
    model_dir = request.getfixturevalue(name)
    if name == "default_model_dir":
        return model_dir, list(REAL_PROMPTS), list(REAL_MAX_TOKENS), False
    prompts = [{"prompt_token_ids": ids} for ids in tiny_prompts(TINY_LENS)]
    return model_dir, prompts, list(TINY_MAX_TOKENS), True


def _kv_memory(model_dir: Path, num_blocks: int, block_size: int = 16) -> int:
    from transformers import AutoConfig

    return num_blocks * kv_bytes_per_block(AutoConfig.from_pretrained(model_dir), block_size, torch.float32)


def _default_args(name: str, model_dir: Path) -> dict:
    """A roomy cache (128 blocks) and chunked prefill with the default token budget."""
    return dict(max_model_len=256 if name == "default_model_dir" else 512,
                kv_cache_memory=_kv_memory(model_dir, 128))


@pytest.mark.parametrize("name", MODELS)
def test_single_prompt(request, name):
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    _case(model_dir, prompts[:1], max_tokens[:1], ignore_eos, **_default_args(name, model_dir))


@pytest.mark.parametrize("name", MODELS)
def test_batch_mixed_lengths(request, name):
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    _case(model_dir, prompts, max_tokens, ignore_eos, **_default_args(name, model_dir))


@pytest.mark.parametrize("name", MODELS)
def test_torch_attention_backend(request, name):
    """attention_backend="torch" with the fused elementwise kernels (where the extension builds)."""
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    llm, _ = _case(model_dir, prompts, max_tokens, ignore_eos, attention_backend="torch",
                   **_default_args(name, model_dir))
    assert llm.llm_engine.runner.backend.name == "torch"


@pytest.mark.parametrize("name", MODELS)
def test_plain_pytorch(request, name, monkeypatch):
    """Where tokenmill's CPU extension can't be built: torch attention, torch RMSNorm / SiLU / RoPE."""
    import tokenmill.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "cpu_ops_available", lambda: False)
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    llm, _ = _case(model_dir, prompts, max_tokens, ignore_eos, **_default_args(name, model_dir))
    model = llm.llm_engine.runner.model
    assert llm.llm_engine.runner.backend.name == "torch"
    assert model.model.norm.ops is None and model.model.layers[0].mlp.ops is None


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_small_budget(request, name):
    """Every prompt is longer than the budget, so each is prefilled over several steps, in chunks
    that don't line up with the blocks, while other requests decode beside it."""
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    budget = 16
    if name != "default_model_dir":
        budget = 4  # the shortest tiny prompt is 5 tokens
    llm, _ = _case(model_dir, prompts, max_tokens, ignore_eos, enable_chunked_prefill=True,
                   max_num_batched_tokens=budget, **_default_args(name, model_dir))
    lens = [len(p["prompt_token_ids"]) if isinstance(p, dict) else len(llm.get_tokenizer().encode(p))
            for p in prompts]
    assert min(lens) > budget


@pytest.mark.parametrize("name", MODELS)
def test_no_chunked_prefill(request, name):
    """Whole prompts only; the budget still spreads the prefills over several steps."""
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    args = _default_args(name, model_dir)
    # The budget must hold a max_model_len prompt; keep it small so prompts wait for their turn.
    args["max_model_len"] = args["max_num_batched_tokens"] = 64 if name == "default_model_dir" else 400
    _case(model_dir, prompts, max_tokens, ignore_eos, enable_chunked_prefill=False, **args)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("name", MODELS)
def test_preemption(request, name, mode):
    """A cache only a few blocks larger than one max_model_len sequence: requests are preempted
    (their KV dropped and recomputed later, or swapped to host memory and back), and the tokens
    must not change. Admission control is off so that preemption really happens."""
    model_dir, prompts, max_tokens, ignore_eos = _setup(request, name)
    if name == "default_model_dir":
        max_model_len = 64
    else:
        # Prompts that fit max_model_len with their max_tokens; same lengths pattern, shorter.
        lens = [20, 45, 90, 33, 64, 71, 28, 52]
        max_tokens = [32, 30, 20, 32, 25, 30, 32, 28]
        prompts = [{"prompt_token_ids": ids} for ids in tiny_prompts(lens)]
        max_model_len = 128
    block_size = 16
    num_blocks = max_model_len // block_size + 2
    llm, outputs = _case(model_dir, prompts, max_tokens, ignore_eos, max_model_len=max_model_len,
                         block_size=block_size, kv_cache_memory=_kv_memory(model_dir, num_blocks, block_size),
                         preemption_mode=mode, enable_admission_control=False)
    engine = llm.llm_engine
    assert engine.num_total_blocks == num_blocks
    assert engine.scheduler.num_preemptions > 0
    assert (engine.scheduler.num_swap_outs > 0) == (mode == "swap")
    assert sum(o.metrics.num_preemptions for o in outputs) == engine.scheduler.num_preemptions


@pytest.mark.parametrize("name", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_prefix_cache_hit(request, name):
    """Prompts sharing a long prefix, run twice: the second run computes only what is not cached,
    and every output still equals transformers'."""
    model_dir = request.getfixturevalue(name)
    rng = random.Random(7)
    prefix = [rng.randrange(100, 49000) for _ in range(70)]
    prompts = [{"prompt_token_ids": prefix + [rng.randrange(100, 49000) for _ in range(n)]} for n in (3, 16, 40, 1)]
    max_tokens = [12, 20, 8, 16]
    llm, _ = _case(model_dir, prompts, max_tokens, True, kv_cache_memory=16 << 20)
    stats = llm.llm_engine.stats().scheduler
    # Within the first run the later prompts already share the prefix's 4 full blocks.
    assert stats.prefix_cache_hits >= 3 * 64
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in max_tokens]
    again = llm.generate(prompts, params, use_tqdm=False)
    for prompt, k, out in zip(prompts, max_tokens, again):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt["prompt_token_ids"], k, True)
    after = llm.llm_engine.stats().scheduler
    assert after.prefix_cache_hits - stats.prefix_cache_hits >= 4 * 64
    llm.llm_engine.check_integrity()
    assert llm.llm_engine.num_used_blocks == 0 and after.num_cached_blocks > 0
