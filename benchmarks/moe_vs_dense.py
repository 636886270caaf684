"""Decode-step time of a tiny mixture-of-experts model vs a dense model of the same active size.

    python benchmarks/moe_vs_dense.py [--dtype float32|bfloat16] [--threads N] [--steps S]

Both are built in-process from transformers configs with random weights (no download): 4 layers,
hidden 512, 8 query / 4 KV heads. The MoE (Mixtral layout) has 8 experts of intermediate 512 with
top-2 routing, so each token goes through 2 x 512 = 1024 intermediate units per layer; the dense
model (Llama layout) has intermediate 1024: the same active parameters per token, 4x fewer in all.
For batch 1 and 32, the prompts (16 tokens) are prefilled first, then S decode steps are timed
(median), the engine's own step(): schedule, model, sample.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from tokenmill import SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.config import EngineConfig
from tokenmill.models.loader import resolve_model

COMMON = dict(vocab_size=49152, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False)


def build(folder: Path, moe: bool) -> Path:
    if moe:
        config = transformers.MixtralConfig(**COMMON, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
                                            architectures=["MixtralForCausalLM"])
    else:
        config = transformers.LlamaConfig(**COMMON, intermediate_size=1024, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained(folder)
    return folder


def decode_step_ms(folder: Path, batch: int, steps: int, dtype: str, threads: int | None) -> float:
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(folder), dtype=dtype, max_model_len=512,
                                                num_threads=threads, async_scheduling=False))
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), {"prompt_token_ids": [100 + 7 * i + j for j in range(16)]}, params)
    engine.step()  # the prompts
    engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.close()
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense, moe = build(Path(tmp) / "dense", moe=False), build(Path(tmp) / "moe", moe=True)
        threads = args.threads or "all the"
        print(f"decode step, median of {args.steps} ({args.dtype}, {threads} threads)")
        print(f"{'batch':>5} {'dense ms':>9} {'moe ms':>9} {'moe/dense':>9}")
        for batch in (1, 32):
            d = decode_step_ms(dense, batch, args.steps, args.dtype, args.threads)
            m = decode_step_ms(moe, batch, args.steps, args.dtype, args.threads)
            print(f"{batch:>5} {d:>9.2f} {m:>9.2f} {m / d:>9.2f}")


if __name__ == "__main__":
    main()
