"""AsyncLLMEngine (background step loop, one async stream per request) and the Prometheus metrics,
in-process on the tiny random Llama.

Greedy decoding with ignore_eos makes each request's tokens a pure function of its prompt, so the
streams of concurrent requests must end with exactly the tokens of the offline LLM.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
from prometheus_client.parser import text_string_to_metric_families
from helpers import TokenIds, greedy

from tokenmill import LLM
from tokenmill.engine.async_engine import AsyncLLMEngine, QueueFullError
from tokenmill.engine.metrics import PrometheusMetrics

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, kv_cache_memory=8 << 20)
ids = TokenIds(7)


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), **ENGINE_ARGS)


def run_with_engine(model_dir, body, **engine_args):
    """Run `body(engine)` (a coroutine function) on a fresh AsyncLLMEngine; shut it down after."""
    async def main():
        engine = AsyncLLMEngine.from_engine_args(model=str(model_dir), **{**ENGINE_ARGS, **engine_args})
        engine.start()
        try:
            return await body(engine)
        finally:
            engine.shutdown()
    return asyncio.run(main())


async def used_blocks(engine: AsyncLLMEngine) -> int:
    def check(e):
        e.check_integrity()
        return e.num_used_blocks
    return await engine.call(check)


def test_concurrent_streams_match_offline_and_grow_monotonically(tiny_llama_dir, offline):
    prompts = [ids(n) for n in (5, 30, 64, 17, 90, 3, 44, 120)]
    max_tokens = [9, 4, 12, 1, 7, 15, 6, 10]
    expected = [o.outputs[0].token_ids for o in offline.generate(
        [{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in max_tokens], use_tqdm=False)]

    async def body(engine):
        async def consume(i):
            history = []
            async for out in engine.generate(f"r{i}", {"prompt_token_ids": prompts[i]}, greedy(max_tokens[i])):
                history.append(out)
            return history

        histories = await asyncio.gather(*(consume(i) for i in range(len(prompts))))
        return histories, await used_blocks(engine)

    histories, used = run_with_engine(tiny_llama_dir, body)
    assert used == 0
    for i, history in enumerate(histories):
        assert history[-1].finished and all(not h.finished for h in history[:-1])
        tokens = [h.outputs[0].token_ids for h in history]
        # Each snapshot extends the one before (a stream may skip snapshots, never reorder them).
        assert all(tokens[k + 1][:len(tokens[k])] == tokens[k] for k in range(len(tokens) - 1))
        assert tokens[-1] == expected[i]
        m = history[-1].metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.num_generation_tokens == max_tokens[i]
        assert (m.time_per_output_token is None) == (max_tokens[i] < 2)


def test_abort_mid_stream_frees_blocks_and_others_finish(tiny_llama_dir, offline):
    keep_prompt = ids(40)
    (expected,) = offline.generate([{"prompt_token_ids": keep_prompt}], greedy(20), use_tqdm=False)

    async def body(engine):
        keep = asyncio.ensure_future(_last(engine.generate("keep", {"prompt_token_ids": keep_prompt}, greedy(20))))
        n = 0
        async with aclosing(engine.generate("victim", {"prompt_token_ids": ids(100)}, greedy(200))) as gen:
            async for out in gen:
                n = len(out.outputs[0].token_ids)
                if n >= 3:
                    break  # leaving the loop (closing the generator) aborts the request
        busy = await engine.call(lambda e: e.get_num_unfinished_requests())
        final = await keep
        return n, busy, final, await used_blocks(engine), await engine.call(lambda e: e.stats())

    n, busy, final, used, stats = run_with_engine(tiny_llama_dir, body)
    assert n >= 3
    assert busy <= 1  # the victim was gone at once; at most "keep" still ran
    assert final.outputs[0].token_ids == expected.outputs[0].token_ids
    assert used == 0
    assert stats.scheduler.num_running == stats.scheduler.num_waiting == 0


async def _last(stream):
    out = None
    async for out in stream:
        pass
    return out


def test_bad_input_raises_and_engine_keeps_serving(tiny_llama_dir):
    async def body(engine):
        with pytest.raises(ValueError, match="prompt"):
            await engine.add_request("bad", {"prompt_token_ids": []}, greedy(3))
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("long", {"prompt_token_ids": ids(300)}, greedy(3))
        with pytest.raises(ValueError, match="already in use"):
            s = await engine.add_request("dup", {"prompt_token_ids": ids(4)}, greedy(3))
            await engine.add_request("dup", {"prompt_token_ids": ids(4)}, greedy(3))
        out = await _last(s)
        return out, await used_blocks(engine)

    out, used = run_with_engine(tiny_llama_dir, body)
    assert out.finished and len(out.outputs[0].token_ids) == 3
    assert used == 0


def test_queue_full_raises(tiny_llama_dir):
    async def body(engine):
        running = await engine.add_request("a", {"prompt_token_ids": ids(8)}, greedy(200))
        await running.__anext__()  # "a" holds the only sequence slot
        waiting = await engine.add_request("b", {"prompt_token_ids": ids(8)}, greedy(2))
        with pytest.raises(QueueFullError):
            for i in range(20):  # "b" waits behind "a" once the next step has run
                s = await engine.add_request(f"c{i}", {"prompt_token_ids": ids(8)}, greedy(2))
                s.abort()
        running.abort()
        out = await _last(waiting)
        return out, await used_blocks(engine)

    out, used = run_with_engine(tiny_llama_dir, body, max_num_seqs=1, max_queued_requests=1)
    assert out.finished and len(out.outputs[0].token_ids) == 2
    assert used == 0


def test_prometheus_metrics_count_what_ran(tiny_llama_dir):
    prompts = [ids(n) for n in (10, 33, 7)]

    async def body(engine):
        metrics = PrometheusMetrics("tiny", engine.stats)
        engine.listener = metrics
        outs = await asyncio.gather(*(_last(engine.generate(f"m{i}", {"prompt_token_ids": p}, greedy(5)))
                                      for i, p in enumerate(prompts)))
        stream = await engine.add_request("gone", {"prompt_token_ids": ids(9)}, greedy(100))
        await stream.__anext__()
        stream.abort()
        await used_blocks(engine)  # the abort has run
        return outs, metrics.render().decode()

    outs, text = run_with_engine(tiny_llama_dir, body, enable_prefix_caching=False)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, s.labels.get("finished_reason"))] = s.value
    assert samples[("tokenmill:request_success_total", "length")] == 3
    assert samples[("tokenmill:request_success_total", "abort")] == 1
    assert samples[("tokenmill:prompt_tokens_total", None)] == sum(map(len, prompts)) + 9
    generated = samples[("tokenmill:generation_tokens_total", None)]
    assert 15 < generated <= 15 + 100
    assert samples[("tokenmill:e2e_request_latency_seconds_count", None)] == 3
    assert samples[("tokenmill:request_queue_time_seconds_count", None)] == 3
    assert samples[("tokenmill:time_to_first_token_seconds_count", None)] == 4  # the aborted one too
    # One inter-token gap per step after the first that advanced a request: 4 per finished one.
    assert samples[("tokenmill:inter_token_latency_seconds_count", None)] >= 12
    ttft_sum = sum(o.metrics.time_to_first_token for o in outs)
    assert samples[("tokenmill:time_to_first_token_seconds_sum", None)] >= ttft_sum
    assert samples[("tokenmill:num_requests_running", None)] == 0
    assert samples[("tokenmill:kv_cache_usage_perc", None)] == 0
