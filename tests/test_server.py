"""The OpenAI-compatible server, as a real `tokenmill serve` process on a free port, driven through
the official `openai` client (and httpx where the client hides what is tested).

The model is the tiny random Llama: greedy decoding with ignore_eos makes every completion a pure
function of its prompt, so the server's text must equal the offline engine's, streamed or not,
alone or among 64 concurrent streams.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from helpers import Server, TokenIds

from tokenmill import LLM, SamplingParams

MAX_LEN = 1024  # the tiny model's own limit: room for long requests that are still running
ENGINE_ARGS = ["--dtype", "float32", "--kv-cache-memory", str(64 << 20), "--max-model-len", str(MAX_LEN)]
ids = TokenIds(11)
_rng = ids.rng


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    """Both servers start at once (startup is mostly imports and loading, on 2 cores)."""
    logs = tmp_path_factory.mktemp("server-logs")
    main = Server(tiny_llama_dir, logs / "main.log", *ENGINE_ARGS)
    guarded = Server(tiny_llama_dir, logs / "guarded.log", *ENGINE_ARGS, "--api-key", "sesame", "--max-num-seqs", "1",
                     "--max-queued-requests", "1", "--served-model-name", "tiny")
    try:
        yield main.wait_ready(), guarded.wait_ready()
    finally:
        main.stop()
        guarded.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=16 << 20)


def offline_text(llm: LLM, prompts: list, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def wait_idle(server: Server, timeout: float = 10.0) -> dict:
    """/metrics once nothing runs or waits and no KV block is used."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m[("tokenmill:num_requests_running", None)] == 0 and m[("tokenmill:num_requests_waiting", None)] == 0
                and m[("tokenmill:kv_cache_usage_perc", None)] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def _counts(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


# ---- basics --------------------------------------------------------------------------------------

def test_models_health_tokenize_detokenize(server, client, model, tiny_llama_dir):
    assert model == str(tiny_llama_dir)
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world, hello tokens"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == MAX_LEN
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]})
    assert r.json()["prompt"] == "Hello world, hello tokens"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


def test_completion_equals_offline_engine(client, model, offline):
    prompt_ids, text_prompt = ids(37), "The quick brown fox jumps over"
    expected = offline_text(offline, [{"prompt_token_ids": prompt_ids}, text_prompt], 12)
    r = client.completions.create(model=model, prompt=[prompt_ids, text_prompt], max_tokens=12, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == expected
    assert all(c.finish_reason == "length" for c in r.choices)
    n_text = len(offline.get_tokenizer().encode(text_prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        37 + n_text, 24, 37 + n_text + 24)
    assert r.model == model and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_completion_streaming_equals_non_streaming(client, model):
    prompt = ids(25)
    full = client.completions.create(model=model, prompt=prompt, max_tokens=20, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2, "the stream came in one piece"
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    # The same prompt again: its first full block (16 tokens) comes from the prefix cache.
    assert not chunks[-1].choices and _counts(chunks[-1].usage) == _counts(full.usage)
    assert (full.usage.prompt_tokens_details.cached_tokens, chunks[-1].usage.prompt_tokens_details.cached_tokens) == (0, 16)
    assert all(c.usage is None for c in text_chunks)


def test_chat_streaming_equals_non_streaming(client, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=16, **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    assert full.usage.completion_tokens == 16 and full.usage.prompt_tokens > 10
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in stream[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full.choices[0].message.content
    cached = (full.usage.prompt_tokens - 1) // 16 * 16  # full blocks before the last token: cached
    assert _counts(stream[-1].usage) == _counts(full.usage)
    assert stream[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"


def test_n2_seeded_and_streamed(client, model):
    args = dict(model=model, prompt=ids(10), max_tokens=10, n=2, temperature=1.0, seed=1234)
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text  # the samples draw differently
    assert a.usage.completion_tokens == 20
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in a.choices]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: equal samples


def test_stop_string_cuts_text_streamed_or_not(client, model):
    prompt = ids(15)
    free = client.completions.create(model=model, prompt=prompt, max_tokens=30, **GREEDY).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 4]
    assert len(stop) == 4
    cut = free[: free.index(stop)]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=30, stop=[stop, "\x00never"], **GREEDY)
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=30, stop=stop, stream=True, **GREEDY))
    assert streamed == cut  # the held-back tail never leaked the stop string's start


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt=ids(12), max_tokens=6, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy took the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert "".join(e.token for e in content) == chat.choices[0].message.content


def test_echo_and_extra_fields(client, model):
    prompt = "Once upon a time"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=5, echo=True, **GREEDY)
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=5, **GREEDY)
    assert r.choices[0].text == prompt + plain.choices[0].text
    # top_k=1 (or min_p=1) leaves only the most likely token: sampling at temperature 1 is greedy.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        s = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=1.0, seed=3,
                                      extra_body={**extra, "ignore_eos": True, "priority": 5, "min_tokens": 2,
                                                  "repetition_penalty": 1.0})
        assert s.choices[0].text == plain.choices[0].text
    pen = client.completions.create(model=model, prompt=ids(5), max_tokens=40, user="tenant-a",
                                    temperature=0, extra_body={"repetition_penalty": 1.3, "ignore_eos": True})
    assert pen.usage.completion_tokens == 40


# ---- bad input -----------------------------------------------------------------------------------

_BAD = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10 ** 9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "seed": 10 ** 30}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "maybe"}}, 400,
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [True]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * MAX_LEN}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content.0.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * MAX_LEN}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools.0.function"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [-5]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
]


def test_bad_input_gets_4xx_naming_the_field(server):
    with httpx.Client(base_url=server.url) as http:
        for path, body, status, param in _BAD:
            r = http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert err["param"] == param, (path, body, err)
            assert err["message"] and err["type"], err
        # Not even a JSON object: still a 400, never a 500.
        for raw in (b'{"prompt": "hi",', b"[1, 2]", b"", b"\xff\xfe"):
            r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (raw, r.text)
            assert r.json()["error"]["message"]
        assert http.post("/v1/nothing", json={}).status_code == 404
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_input_through_the_openai_client(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", temperature=-0.5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"


# ---- disconnects, concurrency, metrics -----------------------------------------------------------

def test_client_disconnect_mid_stream_frees_blocks(server):
    before = wait_idle(server)
    for stream in (True, False):
        payload = {"prompt": ids(50), "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": stream}
        with httpx.Client(base_url=server.url, timeout=0.3) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json=payload) as r:
                    chunks = 0
                    for line in r.iter_lines():
                        chunks += line.startswith("data:")
                        if chunks == 3:
                            break  # leaving the block closes the connection
                assert chunks == 3
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/completions", json=payload)
    after = wait_idle(server)
    assert after[("tokenmill:kv_cache_usage_perc", None)] == 0
    assert after[("tokenmill:num_requests_running", None)] == 0
    aborted = after[("tokenmill:request_success_total", "abort")] - before[("tokenmill:request_success_total", "abort")]
    assert aborted == 2
    generated = (after[("tokenmill:generation_tokens_total", None)]
                 - before[("tokenmill:generation_tokens_total", None)])
    assert 3 <= generated < 1800  # neither request ran to its 900 tokens


def test_64_concurrent_streams_complete_with_correct_text(server, model, offline):
    prompts = [ids(_rng.randrange(4, 60)) for _ in range(64)]
    expected = offline_text(offline, [{"prompt_token_ids": p} for p in prompts], 16)
    before = wait_idle(server)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(prompt):
            text, finish = "", None
            async for chunk in await aclient.completions.create(model=model, prompt=prompt, max_tokens=16,
                                                               stream=True, **GREEDY):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert [t for t, _ in results] == expected
    assert all(f == "length" for _, f in results)
    after = wait_idle(server)
    finished, generated = ("tokenmill:request_success_total", "length"), ("tokenmill:generation_tokens_total", None)
    assert after[finished] - before[finished] == 64
    assert after[generated] - before[generated] == 64 * 16


def test_metrics_parse_and_counters_match(server, client, model):
    before = wait_idle(server)
    prompts = [ids(n) for n in (9, 30, 61)]
    sent_prompt, sent_gen = 0, 0
    for p in prompts:
        r = client.completions.create(model=model, prompt=p, max_tokens=7, **GREEDY)
        sent_prompt += r.usage.prompt_tokens
        sent_gen += r.usage.completion_tokens
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "count"}], max_tokens=4,
                                       **GREEDY)
    sent_prompt += r.usage.prompt_tokens
    sent_gen += r.usage.completion_tokens
    after = wait_idle(server)

    def delta(name, reason=None):
        return after[(name, reason)] - before[(name, reason)]

    assert delta("tokenmill:prompt_tokens_total") == sent_prompt == 9 + 30 + 61 + r.usage.prompt_tokens
    assert delta("tokenmill:generation_tokens_total") == sent_gen == 3 * 7 + 4
    assert delta("tokenmill:request_success_total", "length") == 4
    assert delta("tokenmill:request_success_total", "stop") == 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"tokenmill:{hist}_count") == 4, hist
        assert delta(f"tokenmill:{hist}_sum") >= 0
    assert delta("tokenmill:inter_token_latency_seconds_count") == 3 * 6 + 3
    assert delta("tokenmill:prefix_cache_queries_total") >= delta("tokenmill:prefix_cache_hits_total") >= 0
    for gauge in ("num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc"):
        assert after[(f"tokenmill:{gauge}", None)] == 0
    assert after[("tokenmill:num_preemptions_total", None)] >= 0


def test_bench_serve_against_the_server(server, offline, tmp_path, capsys):
    """`tokenmill bench serve` on a workload of token-id and text prompts: every request completes
    with exactly its max_tokens, and the report counts what the server says it got."""
    import json

    from tokenmill.entrypoints.cli import main as cli_main

    lines = [{"prompt_token_ids": ids(12), "max_tokens": 5}, {"prompt": "Hello there", "max_tokens": 3},
             {"prompt_token_ids": ids(40), "max_tokens": 9}, {"prompt_token_ids": ids(7), "max_tokens": 1}]
    workload, result = tmp_path / "w.jsonl", tmp_path / "result.json"
    workload.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rc = cli_main(["bench", "serve", "--base-url", server.url, "--workload", str(workload), "--request-rate", "20",
                   "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    m = json.loads(result.read_text())
    assert (m["completed"], m["failed"]) == (4, 0)
    assert m["total_output_tokens"] == 5 + 3 + 9 + 1
    assert m["total_input_tokens"] == 12 + 40 + 7 + len(offline.get_tokenizer().encode("Hello there"))
    assert 0 < m["mean_ttft_ms"] <= m["mean_e2el_ms"]
    assert m["p99_itl_ms"] > 0 and m["mean_tpot_ms"] > 0
    assert "Successful requests:                     4" in capsys.readouterr().out
    wait_idle(server)


# ---- API key and the bounded queue (the second server) ---------------------------------------------

def test_api_key(servers):
    guarded = servers[1]
    bad = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    assert httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.post(f"{guarded.url}/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200
    good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == "tiny"
    r = good.completions.create(model="tiny", prompt="hi", max_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3


def test_full_queue_answers_503(servers):
    guarded = servers[1]  # --max-num-seqs 1 --max-queued-requests 1
    headers = {"Authorization": "Bearer sesame"}
    long = {"model": "tiny", "prompt": ids(8), "max_tokens": MAX_LEN - 8, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=guarded.url, headers=headers, timeout=30) as a, \
            httpx.Client(base_url=guarded.url, headers=headers, timeout=30) as b:
        with a.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # NOTE: kept referenced: closing it would disconnect
            while not next(lines).startswith("data:"):  # "a" holds the one slot
                pass
            with b.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 10
                while guarded.metrics()[("tokenmill:num_requests_waiting", None)] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                r = httpx.post(f"{guarded.url}/v1/completions", headers=headers,
                               json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["message"]
    m = wait_idle(guarded)
    assert m[("tokenmill:kv_cache_usage_perc", None)] == 0
    assert httpx.get(f"{guarded.url}/health").status_code == 200
