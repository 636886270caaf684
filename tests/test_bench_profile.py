"""`tokenmill bench profile` on the tiny model: every part is timed, and the parts add up to the step."""
from __future__ import annotations

import json

import pytest

from tokenmill.entrypoints.cli import main as cli_main

SMALL_KV = 4_000_000  # bytes


def run_profile(model_dir, workload, out, batch_sizes: str, steps: int, *extra: str) -> int:
    """`tokenmill bench profile` on the tiny model in float32, one thread, a small cache, the JSON to out."""
    return cli_main(["bench", "profile", "--workload", str(workload), "--batch-sizes", batch_sizes, "--steps", str(steps),
                     "--skip-bandwidth", "--output-json", str(out), "--model", str(model_dir), "--dtype", "float32",
                     "--num-threads", "1", "--kv-cache-memory", str(SMALL_KV), *extra])


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "wl.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": [100 + 17 * i + j for j in range(5 + 9 * i)],
                                        "max_tokens": 4}) + "\n" for i in range(6)))
    return path


@pytest.mark.parametrize("backend,layers", [("cpu", "layers in one C++ call"), ("torch", "layers in Python")])
def test_bench_profile_parts_add_up(ext, tiny_llama_dir, workload, tmp_path, capsys, backend, layers):
    """On the cpu backend the DecoderStack times its own parts; on the torch one the Python loop's
    modules and kernels are wrapped one by one."""
    out = tmp_path / "profile.json"
    rc = run_profile(tiny_llama_dir, workload, out, "2,6", 3, "--attention-backend", backend)
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in results] == [2, 6]
    prompt_lens = [5 + 9 * i for i in range(6)]
    for r in results:
        n = r["batch_size"]
        parts = r["parts_ms"]
        for name in ("paged attention", "projections", "LM head", "sampler", "silu_and_mul",
                     "RMSNorm (+ residual)", "RoPE", "embedding", "scheduler"):
            assert parts[name] > 0, name
        # The parts partition the instrumented step.
        assert sum(parts.values()) == pytest.approx(r["step_instrumented_ms"], rel=1e-6)
        # Every request decodes, each past its prompt by at least one token.
        assert r["context_tokens"] > sum(prompt_lens[:n]) + n
        assert r["attention_gb_s"] > 0 and r["projection_tflop_s"] > 0
    assert "paged attention" in printed and "TFLOP/s" in printed and "2 req" in printed
    assert layers in printed


def test_profile_leaves_no_block_behind(ext, tiny_llama_dir, workload):
    from tokenmill import LLM
    from tokenmill.benchmarks.profile import profile_batch
    from tokenmill.workload import load_workload

    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, kv_cache_memory=SMALL_KV)
    result = profile_batch(llm, load_workload(str(workload)), 4, steps=2)
    assert result["batch_size"] == 4
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
    assert engine.num_used_blocks == 0
    with pytest.raises(ValueError, match="fewer than the batch size 7"):
        profile_batch(llm, load_workload(str(workload)), 7, steps=2)


def test_profile_counts_shared_blocks_once(ext, tiny_llama_dir, tmp_path, capsys):
    """Requests behind one cached 48-token prefix: the K/V they attend counts the prefix per
    request, the distinct K/V once (the step budget of 48 caches the prefix in the first step)."""
    path = tmp_path / "shared.jsonl"
    prefix = [200 + i for i in range(48)]
    path.write_text("".join(json.dumps({"prompt_token_ids": prefix + [1000 + 31 * i + j for j in range(3 + i)],
                                        "max_tokens": 4}) + "\n" for i in range(4)))
    out = tmp_path / "profile.json"
    rc = run_profile(tiny_llama_dir, path, out, "4", 2, "--max-num-batched-tokens", "48")
    assert rc == 0
    (r,) = json.loads(out.read_text())["results"]
    per_token = r["kv_bytes_per_step"] / r["context_tokens"]
    assert r["kv_distinct_bytes_per_step"] == pytest.approx(r["kv_bytes_per_step"] - 3 * 48 * per_token)
    assert "distinct K/V blocks" in capsys.readouterr().out


def test_profile_on_an_int8_cache(ext, tiny_llama_dir, workload, tmp_path, capsys):
    """--kv-cache-dtype int8: the header says so, and the K/V bytes per step are the int8 cache's
    (D int8s + a float32 scale per token, layer, K/V and KV head), not the model dtype's."""
    from transformers import AutoConfig

    out = tmp_path / "profile.json"
    rc = run_profile(tiny_llama_dir, workload, out, "3", 2, "--kv-cache-dtype", "int8")
    assert rc == 0
    assert "KV cache int8" in capsys.readouterr().out
    (r,) = json.loads(out.read_text())["results"]
    c = AutoConfig.from_pretrained(tiny_llama_dir)
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads + 4)
    assert r["kv_bytes_per_step"] == r["context_tokens"] * per_token
