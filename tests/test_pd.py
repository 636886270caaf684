"""Prefill/decode disaggregation over HTTP: a `tokenmill serve --kv-role producer` and a
`--kv-role consumer` process, driven by a client of vLLM's toy proxy protocol (the one of vLLM's
tests/v1/kv_connector/nixl_integration/toy_proxy_server.py) and by the real
`vllm-router --vllm-pd-disaggregation`. Greedy float32: the decode instance's tokens must equal the
offline (monolithic) engine's. Block accounting is read from /metrics (kv_cache_usage_perc 0: no
block referenced); the in-process checks with check_integrity() are in test_kv_transfer.py.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest
from helpers import Router, Server, TokenIds, free_port

from tokenmill import LLM, SamplingParams

MAX_LEN = 1024
ENGINE_ARGS = ["--dtype", "float32", "--kv-cache-memory", str(32 << 20), "--max-model-len", str(MAX_LEN)]
LEASE_S = 3
ids = TokenIds(13)


@pytest.fixture(scope="module")
def pd_pair(tiny_llama_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-logs")
    prod = Server(tiny_llama_dir, logs / "prefill.log", *ENGINE_ARGS, "--kv-role", "producer", "--kv-port",
                  str(free_port()), "--kv-lease-timeout", str(LEASE_S))
    cons = Server(tiny_llama_dir, logs / "decode.log", *ENGINE_ARGS, "--kv-role", "consumer",
                  "--kv-load-timeout", "3")
    try:
        yield prod.wait_ready(), cons.wait_ready()
    finally:
        prod.stop()
        cons.stop()


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=16 << 20)


def expected_texts(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                    use_tqdm=False)]


def metric(server: Server, name: str) -> float:
    return server.metrics()[(f"tokenmill:{name}", None)]


def wait_all_free(*servers: Server, timeout: float = 10.0) -> None:
    """Every block of every server unreferenced (leases included) and nothing waiting for KV."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [s.url for s in servers if metric(s, "kv_cache_usage_perc") != 0
                or metric(s, "num_requests_waiting_for_remote_kv") != 0]
        if not busy:
            return
        assert time.monotonic() < deadline, f"blocks still used on {busy}"
        time.sleep(0.1)


def toy_proxy(prod: Server, cons: Server, body: dict) -> tuple[str, dict | None]:
    """vLLM's toy proxy: P with max_tokens 1 and do_remote_decode, then D with P's kv_transfer_params.
    Returns D's text and usage (the last usage chunk when streaming)."""
    prefill = {**body, "max_tokens": 1, "stream": False, "stream_options": None,
               "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                      "remote_block_ids": None, "remote_host": None, "remote_port": None}}
    r = httpx.post(f"{prod.url}/v1/completions", json=prefill, headers={"X-Request-Id": "toy"}, timeout=30)
    assert r.status_code == 200, r.text
    decode = {**body, "kv_transfer_params": r.json()["kv_transfer_params"]}
    if not body.get("stream"):
        r = httpx.post(f"{cons.url}/v1/completions", json=decode, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["usage"]
    text, usage = "", None
    with httpx.stream("POST", f"{cons.url}/v1/completions", json=decode, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    return text, usage


@pytest.mark.parametrize("stream", [False, True])
def test_toy_proxy_protocol_outputs_equal_monolithic(pd_pair, offline, stream):
    prod, cons = pd_pair
    prompts = [ids(n) for n in (1, 7, 16, 17, 40, 90)]
    expected = expected_texts(offline, prompts, 10)
    received = metric(cons, "kv_transfer_blocks_received_total")
    for p, want in zip(prompts, expected):
        body = {"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        text, usage = toy_proxy(prod, cons, body)
        assert text == want, f"{len(p)}-token prompt"
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(p) - 1  # pulled, not computed
    # Blocks of (prompt - 1) tokens, none held by the consumer before (distinct prompts).
    assert metric(cons, "kv_transfer_blocks_received_total") - received == sum(-(-(len(p) - 1) // 16) for p in prompts)
    wait_all_free(prod, cons)
    assert metric(prod, "kv_transfer_leases_expired_total") == 0


def test_through_vllm_router_pd_mode(pd_pair, offline, tmp_path):
    prod, cons = pd_pair
    router = Router(tmp_path / "router.log", "--vllm-pd-disaggregation", "--prefill", prod.url, "--decode",
                    cons.url, "--policy", "round_robin").wait_ready()
    try:
        prompts = [ids(n) for n in (3, 18, 33, 64)]
        expected = expected_texts(offline, prompts, 12)
        received = metric(cons, "kv_transfer_blocks_received_total")
        for p, want in zip(prompts, expected):
            body = {"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
            with httpx.stream("POST", f"{router.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                text = "".join(c["text"] for line in r.iter_lines() if line.startswith("data: {")
                               for c in json.loads(line[6:])["choices"])
            assert text == want
        # The streamed run found the full blocks in the consumer's prefix cache and pulled the rest.
        assert metric(cons, "kv_transfer_blocks_received_total") > received
        wait_all_free(prod, cons)
        assert metric(prod, "kv_transfer_leases_expired_total") == 0

        # A client that leaves mid-stream: the decode instance aborts; the lease was read already.
        aborts = cons.metrics()[("tokenmill:request_success_total", "abort")]
        body = {"prompt": ids(20), "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=30) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 3:
                    break
        deadline = time.monotonic() + 10
        while cons.metrics()[("tokenmill:request_success_total", "abort")] == aborts:
            assert time.monotonic() < deadline, "the decode instance did not abort"
            time.sleep(0.1)
        wait_all_free(prod, cons)
    finally:
        router.stop()


def test_consumer_never_pulls_producer_frees_at_lease_expiry(pd_pair):
    """The decode instance dies (here: is never asked) after the prefill instance answered."""
    prod, _ = pd_pair
    expired = metric(prod, "kv_transfer_leases_expired_total")
    body = {"prompt": ids(50), "max_tokens": 1, "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    r = httpx.post(f"{prod.url}/v1/completions", json=body, timeout=30)
    assert len(r.json()["kv_transfer_params"]["remote_block_ids"]) == 4  # 50 tokens in blocks of 16
    assert metric(prod, "kv_cache_usage_perc") > 0  # the 4 blocks are leased
    wait_all_free(prod, timeout=LEASE_S + 10)
    assert metric(prod, "kv_transfer_leases_expired_total") == expired + 1


def test_malformed_or_unreachable_kv_transfer_params_compute_locally(pd_pair, offline):
    prod, cons = pd_pair
    prompt = ids(30)
    (want,) = expected_texts(offline, [prompt], 6)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    malformed = {"do_remote_prefill": True, "remote_block_ids": "none", "remote_host": "127.0.0.1"}
    r = httpx.post(f"{cons.url}/v1/completions", json={**body, "kv_transfer_params": malformed}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert "kv_transfer_params.remote_block_ids must be a non-empty list" in cons.log_path.read_text()
    # A producer that is gone: the pull fails at once (connection refused) and D recomputes.
    failures = metric(cons, "kv_transfer_load_failures_total")
    gone = {"do_remote_prefill": True, "remote_block_ids": [0, 1], "remote_host": "127.0.0.1",
            "remote_port": free_port(), "remote_request_id": "lost", "remote_engine_id": "x"}
    r = httpx.post(f"{cons.url}/v1/completions", json={**body, "prompt": ids(31), "kv_transfer_params": gone},
                   timeout=30)
    assert r.status_code == 200
    assert metric(cons, "kv_transfer_load_failures_total") == failures + 1
    wait_all_free(prod, cons)
