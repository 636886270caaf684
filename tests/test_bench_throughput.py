"""`tokenmill bench throughput` and benchmarks/compare.py (transformers rows, vLLM skipped), on the tiny model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenmill.entrypoints.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
KEYS = {"elapsed_time", "num_requests", "total_num_tokens", "total_prompt_tokens", "total_output_tokens",
        "requests_per_second", "tokens_per_second", "output_tokens_per_second", "startup_seconds",
        "time_to_first_token_from_start_seconds"}
SMALL_KV = 4_000_000  # bytes: the default (a tenth of free RAM) takes seconds to allocate


@pytest.fixture
def workload(tmp_path) -> tuple[Path, list[dict]]:
    reqs = [{"prompt_token_ids": [100 + 13 * i + j for j in range(plen)], "max_tokens": mt}
            for i, (plen, mt) in enumerate([(5, 3), (17, 6), (9, 1), (33, 4)])]
    path = tmp_path / "wl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path, reqs


def test_bench_throughput_json(tiny_llama_dir, workload, tmp_path, capsys):
    path, reqs = workload
    out = tmp_path / "tp.json"
    engine = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--num-threads", "1",
              "--kv-cache-memory", str(SMALL_KV)]
    rc = cli_main(["bench", "throughput", "--workload", str(path), "--output-json", str(out), "--disable-tqdm"]
                  + engine)
    assert rc == 0
    m = json.loads(out.read_text())
    assert KEYS <= set(m)
    n_prompt = sum(len(r["prompt_token_ids"]) for r in reqs)
    n_out = sum(r["max_tokens"] for r in reqs)
    assert (m["num_requests"], m["total_prompt_tokens"], m["total_output_tokens"]) == (4, n_prompt, n_out)
    assert m["total_num_tokens"] == n_prompt + n_out
    assert m["tokens_per_second"] == pytest.approx(m["total_num_tokens"] / m["elapsed_time"])
    assert m["output_tokens_per_second"] == pytest.approx(n_out / m["elapsed_time"])
    assert m["requests_per_second"] == pytest.approx(4 / m["elapsed_time"])
    assert 0 < m["startup_seconds"] < m["time_to_first_token_from_start_seconds"]
    assert m["engine_settings"]["dtype"] == "float32" and m["engine_args"]["num_threads"] == 1
    text = capsys.readouterr().out
    assert "Throughput: " in text and "requests/s" in text and "output tokens/s" in text
    assert f"Total num prompt tokens:  {n_prompt}" in text and f"Total num output tokens:  {n_out}" in text

    # --num-prompts takes the first N lines
    assert cli_main(["bench", "throughput", "--workload", str(path), "--num-prompts", "2",
                     "--output-json", str(out), "--disable-tqdm"] + engine) == 0
    m = json.loads(out.read_text())
    assert (m["num_requests"], m["total_output_tokens"]) == (2, 9)


def test_compare_skip_vllm(tiny_llama_dir, workload, tmp_path, capsys):
    path, reqs = workload
    spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out = tmp_path / "cmp.json"
    rc = compare.main(["--workload", str(path), "--model", str(tiny_llama_dir), "--dtype", "float32",
                       "--num-prompts", "3", "--hf-subset", "2", "--hf-batch-size", "2", "--skip-vllm",
                       "--output-json", str(out), "--num-threads", "1", "--kv-cache-memory", str(SMALL_KV)])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("engine "):]
    for label in ("tokenmill", "transformers (1 at a time)", "transformers (static batch 2)"):
        assert any(line.startswith(label) for line in table.splitlines()), (label, table)
    assert "skipped vLLM: --skip-vllm" in text
    result = json.loads(out.read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == {"tokenmill", "transformers (1 at a time)", "transformers (static batch 2)"}
    assert rows["tokenmill"]["num_requests"] == 3 and rows["tokenmill"]["total_output_tokens"] == 10
    assert rows["transformers (1 at a time)"]["num_requests"] == 2
    assert rows["transformers (1 at a time)"]["total_output_tokens"] == 9
    # static batches [3, 6] and [1] run to 6 and 1 tokens, but count each request's own max_tokens
    batched = rows["transformers (static batch 2)"]
    assert batched["total_output_tokens"] == 10 and batched["tokens_generated_incl_padding"] == 13
    assert all(KEYS <= set(r) for r in rows.values())
