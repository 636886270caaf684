"""The decoder layers as one C++ call (models/layers/decoder_stack.py) against the Python loop.

The stack runs the same kernels in the same order as llama.py's loop, so an engine run with it
gives the loop's tokens and logprobs exactly: checked on Llama and Qwen2 (q/k/v biases), float32
and bfloat16, the int8 cache, prepacked and plain linears, over chunked prompts, a shared prefix
and preemptions. (tests/test_model_families.py checks the families it takes against transformers.)
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig

from tokenmill import LLM, SamplingParams
from tokenmill.models.layers.decoder_stack import DecoderStack
from tokenmill.worker.kv_cache import kv_bytes_per_block

pytestmark = pytest.mark.usefixtures("two_threads")


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(100, 49000) for _ in range(80)]  # shared by the first three (cascade pass)
    prompts = [prefix + [rng.randrange(100, 49000) for _ in range(n)] for n in (3, 11, 26)]
    return prompts + [[rng.randrange(100, 49000) for _ in range(n)] for n in (5, 41, 70)]


def _engine(model_dir, dtype: str, kv_cache_dtype: str = "auto") -> LLM:
    """A 16-token budget (every prompt in several chunks) and a cache too small for the batch."""
    cache_dtype = torch.int8 if kv_cache_dtype == "int8" else getattr(torch, dtype)
    per_block = kv_bytes_per_block(AutoConfig.from_pretrained(model_dir), 8, cache_dtype)
    return LLM(str(model_dir), dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=8, max_model_len=128,
               kv_cache_memory=20 * per_block, max_num_batched_tokens=16, enable_admission_control=False)


def _run(llm: LLM):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    engine = llm.llm_engine
    engine.check_integrity()
    assert engine.num_used_blocks == 0
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture
def counted_calls(monkeypatch):
    """How many forward passes went through a DecoderStack."""
    calls = []
    call = DecoderStack.__call__

    def counting(self, x, *args):
        calls.append(x.shape[0])
        return call(self, x, *args)
    monkeypatch.setattr(DecoderStack, "__call__", counting)
    return calls


@pytest.mark.parametrize("dtype,kv_cache_dtype", [("float32", "auto"), ("bfloat16", "auto"), ("float32", "int8")])
def test_stack_equals_the_python_loop(ext, tiny_model_dir, counted_calls, dtype, kv_cache_dtype):
    llm = _engine(tiny_model_dir, dtype, kv_cache_dtype)
    model = llm.llm_engine.runner.model
    stack = model.decoder_stack
    assert isinstance(stack, DecoderStack)
    with_stack = _run(llm)
    assert len(counted_calls) > 10 and 16 in counted_calls, "the steps did not go through the stack"
    assert llm.llm_engine.scheduler.num_preemptions > 0, "no request was preempted"
    assert llm.llm_engine.stats().scheduler.prefix_cache_hits > 0
    model.decoder_stack = None
    calls = len(counted_calls)
    assert _run(llm) == with_stack
    assert len(counted_calls) == calls


def test_plain_linears(ext, tiny_llama_dir, counted_calls, monkeypatch):
    """Weights the loader did not prepack go through at::linear, with the same results."""
    import tokenmill.models.loader as loader

    monkeypatch.setattr(loader, "prepack_linears", lambda model: 0)
    llm = _engine(tiny_llama_dir, "float32")
    model = llm.llm_engine.runner.model
    assert type(model.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    assert model.decoder_stack is not None
    with_stack = _run(llm)
    assert counted_calls
    model.decoder_stack = None
    assert _run(llm) == with_stack


def test_no_stack_without_the_cpu_kernels(ext, tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", attention_backend="torch", kv_cache_memory=2_000_000)
    assert llm.llm_engine.runner.model.decoder_stack is None


def test_timings_add_up_per_part(ext, tiny_llama_dir):
    llm = _engine(tiny_llama_dir, "float32")
    stack = llm.llm_engine.runner.model.decoder_stack
    stack.timings = torch.zeros(len(DecoderStack.PARTS), dtype=torch.float64)
    llm.generate([{"prompt_token_ids": [300, 301, 302]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert (stack.timings > 0).all(), dict(zip(DecoderStack.PARTS, stack.timings.tolist()))
    with pytest.raises(RuntimeError, match="timings must be a contiguous float64 tensor of 5 seconds"):
        stack.timings = torch.zeros(4, dtype=torch.float64)
        llm.generate([{"prompt_token_ids": [300, 301]}], SamplingParams(max_tokens=1), use_tqdm=False)


def test_one_cache_per_layer(ext, tiny_llama_dir):
    llm = _engine(tiny_llama_dir, "float32")
    runner = llm.llm_engine.runner
    stack = runner.model.decoder_stack
    x = torch.zeros(1, 64)
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="one KV cache per layer: 2 layers, 1 caches"):
        stack._stack.forward(x, torch.zeros(1, dtype=torch.int64), stack._rotary.cos, stack._rotary.sin,
                             runner.kv_caches[:1], torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                             torch.tensor([0, 1], dtype=torch.int32), one, torch.zeros(0, 6, dtype=torch.int32),
                             torch.zeros(0, 5, dtype=torch.int32))
