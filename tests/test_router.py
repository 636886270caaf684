"""Data-parallel replicas: two real `tokenmill serve` processes behind a real `vllm-router` (the Rust
router vLLM users run), driven over HTTP as a client would.

Which replica served a request is read from each replica's own /metrics (request_success), so the
tests see the router's decisions without trusting its logs. Greedy float32 with ignore_eos makes every
completion a pure function of its prompt: the router's answers must equal the offline engine's.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from helpers import Router, Server, TokenIds

from tokenmill import LLM, SamplingParams

MAX_LEN = 1024
ENGINE_ARGS = ["--dtype", "float32", "--kv-cache-memory", str(32 << 20), "--max-model-len", str(MAX_LEN)]
ids = TokenIds(12)


def served(server: Server) -> float:
    """Requests the server has finished (all finish reasons)."""
    return sum(v for (name, _), v in server.metrics().items() if name == "tokenmill:request_success_total")


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("router-logs")
    servers = [Server(tiny_llama_dir, logs / f"replica{i}.log", *ENGINE_ARGS) for i in range(2)]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def router_for(replicas, tmp_path):
    started = []

    def start(policy: str, *extra: str) -> Router:
        router = Router(tmp_path / f"router-{policy}.log", "--worker-urls", *(s.url for s in replicas),
                        "--policy", policy, *extra)
        started.append(router)
        return router.wait_ready()

    yield start
    for router in started:
        router.stop()


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=16 << 20)


def offline_texts(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                    use_tqdm=False)]


def complete(url: str, prompt: list[int], max_tokens: int, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_worker_endpoints_the_router_reads(replicas):
    s = replicas[0]
    assert httpx.get(f"{s.url}/get_load").json() == {"load": 0}
    assert httpx.get(f"{s.url}/load").json() == {"server_load": 0}
    info = httpx.get(f"{s.url}/get_server_info", headers={"Authorization": "Bearer"}).json()
    assert info["max_model_len"] == MAX_LEN and info["block_size"] == 16 and info["num_kv_blocks"] > 0
    # Fields a router adds that tokenmill has no use for are ignored; the router's request id is the
    # request's id.
    r = complete(s.url, ids(8), 3, no_stop_trim=True, separate_reasoning=False, return_hidden_states=False)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ids(8), "max_tokens": 2},
                   headers={"X-Request-Id": "router-42", "Authorization": "Bearer"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-router-42" and r.headers["x-request-id"] == "router-42"


@pytest.mark.parametrize("policy", ["round_robin", "power_of_two", "cache_aware"])
def test_router_spreads_requests_and_outputs_are_exact(policy, replicas, router_for, offline):
    router = router_for(policy)
    prompts = [ids(5 + 3 * i) for i in range(12)]
    expected = offline_texts(offline, prompts, 8)
    before = [served(s) for s in replicas]
    texts, cached = [], []
    for p in prompts:
        r = complete(router.url, p, 8)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert texts == expected
    assert cached == [0] * 12  # distinct prompts: nothing to reuse
    counts = [served(s) - b for s, b in zip(replicas, before)]
    assert sum(counts) == 12
    if policy == "round_robin":
        assert counts == [6, 6]
    elif policy == "power_of_two":
        assert min(counts) > 0, counts  # idle loads tie: two random picks spread the requests


def test_cached_tokens_through_the_router(replicas, router_for):
    router = router_for("consistent_hash")
    prompt = ids(40)  # two full blocks of 16: the second request reuses both (on the same replica)
    first = complete(router.url, prompt, 2, user="alice").json()
    second = complete(router.url, prompt, 2, user="alice").json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


def test_killed_replica_the_other_replicas_clients_complete(replicas, router_for, offline):
    """Eight long streams, four on each replica; one replica is killed mid-run. The four on the
    other finish, exact; the four on the dead one end (with an error), none hangs; later requests
    all succeed (the router sends them to the live replica)."""
    router = router_for("round_robin", "--health-check-interval-secs", "1", "--health-failure-threshold", "1")
    live, victim = replicas
    prompts = [ids(6) for _ in range(8)]
    max_tokens = 900  # long enough to still be running when the replica dies
    expected = offline_texts(offline, prompts, max_tokens)
    before = served(live)

    async def run() -> list[str | None]:
        started = asyncio.Event()
        first_chunks = 0

        async def stream(client: httpx.AsyncClient, prompt: list[int]) -> str | None:
            nonlocal first_chunks
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            text, seen_first, done = "", False, False
            try:
                async with client.stream("POST", f"{router.url}/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"choices"' in line:
                            chunk = json.loads(line[6:])
                            text += "".join(c["text"] for c in chunk["choices"])
                            if not seen_first:
                                seen_first, first_chunks = True, first_chunks + 1
                                if first_chunks == len(prompts):
                                    started.set()
            except httpx.HTTPError:
                pass
            return text if done else None

        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(stream(client, p)) for p in prompts]
            await asyncio.sleep(0)
            await asyncio.wait_for(started.wait(), 60)
            victim.proc.kill()
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    victim.proc.wait()
    completed = [i for i, t in enumerate(results) if t is not None]
    assert len(completed) == 4, results  # round robin: four streams were on each replica
    assert [results[i] for i in completed] == [expected[i] for i in completed]
    assert served(live) - before == 4
    # The router no longer sends anything to the dead replica.
    later = [ids(9) for _ in range(6)]
    texts = [complete(router.url, p, 5).json()["choices"][0]["text"] for p in later]
    assert texts == offline_texts(offline, later, 5)
