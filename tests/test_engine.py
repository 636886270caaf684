"""The engine API (LLMEngine and LLM) and its handling of bad input, on the tiny random Llama.

Greedy decoding with ignore_eos makes every request's tokens a pure function of its prompt and
max_tokens, whatever else shares the batch, so a request that survives an abort or a rejected
neighbour must produce exactly the tokens of a clean run of its own.
"""
from __future__ import annotations

import re

import pytest
import torch
from helpers import TokenIds, greedy

from tokenmill import LLM, RequestOutput, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.worker.kv_cache import kv_bytes_per_block

MAX_LEN = 256
VOCAB = 49152
ids = TokenIds(42)


def _block_bytes(model_dir) -> int:
    from transformers import AutoConfig

    return kv_bytes_per_block(AutoConfig.from_pretrained(model_dir), 16, torch.float32)


def make_llm(model_dir, **kw) -> LLM:
    args = dict(dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=64 * _block_bytes(model_dir))
    args.update(kw)
    return LLM(str(model_dir), **args)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def small_budget_llm(tiny_llama_dir) -> LLM:
    """Prompts are prefilled 8 tokens a step, so a request can be caught mid-prefill."""
    return make_llm(tiny_llama_dir, max_num_batched_tokens=8)


@pytest.fixture
def engine(llm) -> LLMEngine:
    """The shared engine; each test must leave it idle, with every block free."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    yield engine
    leftover = list(engine._parents)
    engine.abort_request(leftover)
    engine.check_integrity()
    assert not leftover, f"the test left requests behind: {leftover}"
    assert engine.num_used_blocks == 0


_REFERENCE: dict[tuple, list[int]] = {}


def reference(llm: LLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The tokens of a clean run of the prompt alone (computed on the idle shared engine)."""
    key = (tuple(prompt_ids), max_tokens)
    if key not in _REFERENCE:
        assert not llm.llm_engine.has_unfinished_requests()
        (out,) = llm.generate([{"prompt_token_ids": prompt_ids}], greedy(max_tokens), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == max_tokens
        _REFERENCE[key] = out.outputs[0].token_ids
    return _REFERENCE[key]


def drain(engine: LLMEngine, max_steps: int = 5000) -> dict[str, RequestOutput]:
    """Step until idle, checking the block accounting after every step; the final outputs by id."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id not in final, "output after the request finished"
            if out.finished:
                final[out.request_id] = out
        engine.check_integrity()
    else:
        raise AssertionError("the engine did not finish its requests")
    engine.check_integrity()
    assert engine.num_used_blocks == 0
    return final


def live_request(engine: LLMEngine, request_id: str):
    return next((r for r in engine.scheduler.live_requests() if r.request_id == request_id), None)


# ---- LLMEngine: add_request / step / abort_request ----------------------------------------------


def test_step_api_streams_until_finished(llm, engine):
    prompts = {"a": ids(40), "b": ids(7), "c": ids(90)}
    max_tokens = {"a": 6, "b": 10, "c": 3}
    expected = {rid: reference(llm, prompts[rid], max_tokens[rid]) for rid in prompts}

    assert not engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 0
    assert engine.step() == []  # nothing to do
    for n, rid in enumerate(prompts, 1):
        engine.add_request(rid, prompts[rid], greedy(max_tokens[rid]))
        assert engine.get_num_unfinished_requests() == n
    assert engine.has_unfinished_requests()

    seen: dict[str, list[list[int]]] = {rid: [] for rid in prompts}
    finished_order = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        engine.check_integrity()
        assert outs, "a step with live requests produced nothing"
        for out in outs:
            tokens = out.outputs[0].token_ids
            seen[out.request_id].append(tokens)
            assert out.prompt_token_ids == prompts[out.request_id]
            if out.finished:
                finished_order.append(out.request_id)
                assert out.outputs[0].finish_reason == "length"
            else:
                assert out.outputs[0].finish_reason is None
        assert engine.get_num_unfinished_requests() == len(prompts) - len(finished_order)
    # Outputs are cumulative, one new token per step, up to exactly max_tokens.
    for rid, history in seen.items():
        assert [len(t) for t in history] == list(range(1, max_tokens[rid] + 1))
        assert all(history[i] == history[-1][: i + 1] for i in range(len(history)))
        assert history[-1] == expected[rid]
    assert finished_order == ["c", "a", "b"]
    assert engine.num_used_blocks == 0
    engine.check_integrity()


def test_final_only_requests_yield_just_their_finished_output(llm, engine):
    from tokenmill import RequestOutputKind

    engine.add_request("cum", ids(12), greedy(5))
    engine.add_request("fin", ids(9), SamplingParams(max_tokens=5, ignore_eos=True, n=2, temperature=0.7, seed=3,
                                                     output_kind=RequestOutputKind.FINAL_ONLY))
    seen: dict[str, list[RequestOutput]] = {"cum": [], "fin": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [len(o.outputs[0].token_ids) for o in seen["cum"]] == [1, 2, 3, 4, 5]
    (fin,) = seen["fin"]
    assert fin.finished and [len(c.token_ids) for c in fin.outputs] == [5, 5]
    with pytest.raises(ValueError, match="output_kind must be one of"):
        SamplingParams(output_kind="final")


def test_generate_returns_outputs_in_input_order(llm, engine):
    lens, max_tokens = [60, 5, 120, 20, 33], [3, 30, 1, 12, 7]  # they finish in another order
    prompts = [ids(n) for n in lens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [greedy(k) for k in max_tokens], use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == max_tokens
    assert len({o.request_id for o in outputs}) == len(prompts)
    for p, k, o in zip(prompts, max_tokens, outputs):
        assert o.outputs[0].token_ids == reference(llm, p, k)
    engine.check_integrity()
    assert engine.num_used_blocks == 0


def test_generate_accepts_single_prompts(llm, engine):
    p = ids(12)
    expected = reference(llm, p, 4)
    for prompt in (p, {"prompt_token_ids": p}):
        (out,) = llm.generate(prompt, greedy(4), use_tqdm=False)
        assert out.outputs[0].token_ids == expected
    assert llm.generate([], greedy(4), use_tqdm=False) == []


def test_request_output_fields(llm, engine):
    tok = llm.get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog"
    (out,) = llm.generate(text, greedy(9), use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert isinstance(out.request_id, str)
    assert out.prompt == text
    assert out.prompt_token_ids == tok.encode(text)
    assert out.finished
    assert len(out.outputs) == 1
    c = out.outputs[0]
    assert c.index == 0
    assert len(c.token_ids) == 9 and all(0 <= t < VOCAB for t in c.token_ids)
    assert c.token_ids == reference(llm, out.prompt_token_ids, 9)
    assert isinstance(c.text, str)
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert c.finish_reason == "length" and c.finished
    assert c.stop_reason is None
    assert c.logprobs is None and c.cumulative_logprob is None

    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.num_preemptions == 0
    assert m.queue_time >= 0 and m.time_to_first_token >= m.queue_time and m.e2e_latency >= m.time_to_first_token

    # A token-id prompt has no text.
    (out,) = llm.generate({"prompt_token_ids": [500, 600, 700]}, greedy(2), use_tqdm=False)
    assert out.prompt is None and out.prompt_token_ids == [500, 600, 700]


def test_metrics_while_running(llm, engine):
    engine.add_request("m", ids(30), greedy(3))
    (out,) = engine.step()
    m = out.metrics
    assert not out.finished and m.finished_time is None and m.e2e_latency is None
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time == m.last_token_time
    final = drain(engine)
    m2 = final["m"].metrics
    assert m2.first_token_time == m.first_token_time and m2.last_token_time <= m2.finished_time


def test_prompt_of_max_model_len_minus_one_generates_one_token(llm, engine):
    engine.add_request("edge", ids(MAX_LEN - 1), greedy(50))
    out = drain(engine)["edge"]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    # max_tokens=None: generate up to max_model_len.
    engine.add_request("fill", ids(MAX_LEN - 20), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    out = drain(engine)["fill"]
    assert len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"


# ---- abort -----------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["waiting", "prefill", "decode"])
def test_abort_frees_blocks(llm, small_budget_llm, when):
    engine = small_budget_llm.llm_engine
    assert not engine.has_unfinished_requests()
    others = {"o1": (ids(30), 12), "o2": (ids(25), 8)}
    expected = {rid: reference(llm, p, k) for rid, (p, k) in others.items()}
    engine.add_request("o1", others["o1"][0], greedy(others["o1"][1]))
    engine.add_request("victim", ids(40), greedy(20))
    engine.add_request("o2", others["o2"][0], greedy(others["o2"][1]))

    def victim():
        return live_request(engine, "victim")

    caught = {
        "waiting": lambda r: r.num_computed_tokens == 0,
        "prefill": lambda r: 0 < r.num_computed_tokens < r.num_prompt_tokens,
        "decode": lambda r: r.num_output_tokens >= 2,
    }[when]
    steps = 0
    if when == "waiting":
        engine.step()  # o1 takes the whole budget; the victim waits
        engine.check_integrity()
    while not caught(victim()):
        engine.step()
        engine.check_integrity()
        steps += 1
        assert steps < 200
    r = victim()
    assert not r.is_finished
    if when == "waiting":
        assert r.block_ids == []
    else:
        assert r.block_ids, "the victim should hold blocks"
    used_before, held = engine.num_used_blocks, len(r.block_ids)
    engine.abort_request("victim")
    engine.check_integrity()
    assert victim() is None
    assert engine.num_used_blocks == used_before - held
    assert r.finish_reason == "abort"
    assert engine.get_num_unfinished_requests() == 2

    final = drain(engine)
    assert "victim" not in final
    assert set(final) == {"o1", "o2"}
    for rid, out in final.items():
        assert out.outputs[0].token_ids == expected[rid]
    assert engine.num_used_blocks == 0


def test_abort_misc(llm, engine):
    p = ids(20)
    expected = reference(llm, p, 5)
    # Unknown and repeated ids are no-ops; a list aborts several.
    engine.abort_request("nope")
    engine.add_request("x", ids(10), greedy(5))
    engine.add_request("y", ids(10), greedy(5))
    engine.add_request("keep", p, greedy(5))
    engine.step()
    engine.abort_request(["x", "y", "nope"])
    engine.abort_request("x")
    engine.check_integrity()
    assert engine.get_num_unfinished_requests() == 1
    final = drain(engine)
    assert list(final) == ["keep"] and final["keep"].outputs[0].token_ids == expected
    engine.abort_request("keep")  # already finished: nothing happens
    engine.check_integrity()

    # An n > 1 request: all its samples go at once.
    engine.add_request("multi", ids(30), SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10))
    for _ in range(3):
        engine.step()
    assert engine.num_used_blocks > 0
    engine.abort_request("multi")
    engine.check_integrity()
    assert engine.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []

    # Abort everything mid-flight.
    for i in range(4):
        engine.add_request(f"all{i}", ids(15 + 10 * i), greedy(8))
    for _ in range(3):
        engine.step()
    engine.abort_request([f"all{i}" for i in range(4)])
    engine.check_integrity()
    assert engine.num_used_blocks == 0 and not engine.has_unfinished_requests()
    # The ids are free again.
    engine.add_request("all0", p, greedy(5))
    assert drain(engine)["all0"].outputs[0].token_ids == expected


# ---- bad input --------------------------------------------------------------------------------

BAD_PROMPTS = [
    ("", "empty"),
    ([], "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt": ""}, "empty"),
    ([100] * MAX_LEN, "max_model_len"),
    ([100] * (MAX_LEN + 10), "max_model_len"),
    ("hello world " * MAX_LEN, "max_model_len"),
    ([100, 10**6], "vocabulary"),
    ([100, VOCAB], "vocabulary"),
    ([-1, 100], "vocabulary"),
    ({"prompt_token_ids": [100, -1]}, "vocabulary"),
    ([100, 1.5], "integer"),
    ([100, "7"], "integer"),
    ({"prompt_token_ids": 5}, "list"),
    ({"text": "hi"}, "prompt"),
    (None, "prompt"),
    (12, "prompt"),
]


def _queue_others(engine: LLMEngine, llm: LLM) -> dict[str, list[int]]:
    """Two requests in flight (one decoding, one waiting) and their expected tokens."""
    prompts = {"g1": (ids(35), 10), "g2": (ids(18), 6)}
    expected = {rid: reference(llm, p, k) for rid, (p, k) in prompts.items()}
    engine.add_request("g1", prompts["g1"][0], greedy(prompts["g1"][1]))
    engine.step()
    engine.add_request("g2", prompts["g2"][0], greedy(prompts["g2"][1]))
    return expected


def _others_complete(engine: LLMEngine, expected: dict[str, list[int]]) -> None:
    engine.check_integrity()
    assert engine.get_num_unfinished_requests() == len(expected)
    final = drain(engine)
    assert set(final) == set(expected)
    for rid, tokens in expected.items():
        assert final[rid].outputs[0].token_ids == tokens


@pytest.mark.parametrize("prompt, match", BAD_PROMPTS, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD_PROMPTS)])
def test_bad_prompt_rejected_others_served(llm, engine, prompt, match):
    expected = _queue_others(engine, llm)
    used = engine.num_used_blocks
    with pytest.raises(ValueError, match=match) as e:
        engine.add_request("bad", prompt, greedy(4))
    assert getattr(e.value, "param", None) in ("prompt", "prompt_token_ids")  # the field, for the server
    assert engine.num_used_blocks == used
    assert "bad" not in engine._parents and live_request(engine, "bad") is None
    _others_complete(engine, expected)
    # The rejected id was not taken.
    engine.add_request("bad", [500, 501], greedy(2))
    assert len(drain(engine)["bad"].outputs[0].token_ids) == 2


@pytest.mark.parametrize("params, match", [
    ("greedy", "SamplingParams"),
    (SamplingParams(stop_token_ids=[VOCAB]), "vocabulary"),
])
def test_bad_sampling_params_rejected(llm, engine, params, match):
    expected = _queue_others(engine, llm)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", [500, 501], params)
    _others_complete(engine, expected)


def test_invalid_sampling_params_raise():
    for kw in [dict(temperature=-1), dict(max_tokens=0), dict(n=0), dict(top_p=0.0), dict(top_k=0),
               dict(min_tokens=5, max_tokens=2)]:
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_duplicate_request_id(llm, engine):
    expected = _queue_others(engine, llm)
    prompt_g1 = live_request(engine, "g1").prompt_token_ids
    with pytest.raises(ValueError, match="g1"):
        engine.add_request("g1", ids(9), greedy(3))
    with pytest.raises(ValueError, match="g2"):
        engine.add_request("g2", ids(9), greedy(3))
    assert live_request(engine, "g1").prompt_token_ids == prompt_g1
    _others_complete(engine, expected)
    # Once finished, an id may be used again.
    engine.add_request("g1", [500, 501], greedy(2))
    drain(engine)


def test_request_id_clashing_with_sample_ids(llm, engine):
    """The samples of an n > 1 request "x" are named "0_x", "1_x", ...: a user id equal to one of
    them would corrupt the engine's bookkeeping, so it is refused while the other lives."""
    expected_0x = reference(llm, [500, 501, 502], 4)
    expected = _queue_others(engine, llm)
    engine.add_request("0_x", [500, 501, 502], greedy(4))
    with pytest.raises(ValueError, match="0_x"):
        engine.add_request("x", [600, 601], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4))
    engine.add_request("y", [600, 601], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4))
    with pytest.raises(ValueError, match="1_y"):
        engine.add_request("1_y", [700, 701], greedy(4))
    expected["0_x"] = expected_0x
    engine.check_integrity()
    final = drain(engine)
    y = final.pop("y")
    assert [len(c.token_ids) for c in y.outputs] == [4, 4] and [c.index for c in y.outputs] == [0, 1]
    assert {rid: o.outputs[0].token_ids for rid, o in final.items()} == expected


def test_unknown_engine_argument_and_bad_dtype(tiny_llama_dir, llm, engine):
    expected = _queue_others(engine, llm)
    with pytest.raises(ValueError, match="not_a_knob"):
        LLM(str(tiny_llama_dir), not_a_knob=1)
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(str(tiny_llama_dir), dtype="float32", max_num_seq=4)  # a typo of max_num_seqs
    for dtype in ["float64", "int8", "fp32", torch.float32]:
        with pytest.raises(ValueError, match="dtype"):
            LLM(str(tiny_llama_dir), dtype=dtype)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tiny_llama_dir), dtype="float32", block_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama_dir), dtype="float32", max_model_len=10**6)
    with pytest.raises(ValueError, match="model"):
        LLM(str(tiny_llama_dir / "no-such-folder"), dtype="float32")
    _others_complete(engine, expected)


def test_generate_is_all_or_nothing(llm, engine):
    good = [ids(20), ids(33), ids(8)]
    expected = [reference(llm, p, 5) for p in good]
    for bad_at in [0, 1, 3]:
        batch: list = [{"prompt_token_ids": p} for p in good]
        batch.insert(bad_at, {"prompt_token_ids": [100, 10**6]})
        with pytest.raises(ValueError, match="vocabulary"):
            llm.generate(batch, greedy(5), use_tqdm=False)
        assert engine.get_num_unfinished_requests() == 0
        engine.check_integrity()
        assert engine.num_used_blocks == 0
    # A bad SamplingParams in the list, and a list of the wrong length.
    params = [greedy(5), greedy(5), SamplingParams(stop_token_ids=[VOCAB])]
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([{"prompt_token_ids": p} for p in good], params, use_tqdm=False)
    assert engine.get_num_unfinished_requests() == 0
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([{"prompt_token_ids": p} for p in good], [greedy(5)] * 2, use_tqdm=False)
    assert engine.get_num_unfinished_requests() == 0
    engine.check_integrity()
    # The engine still serves the good prompts, correctly.
    outputs = llm.generate([{"prompt_token_ids": p} for p in good], greedy(5), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


# ---- configuration -----------------------------------------------------------------------------


def test_kv_cache_too_small_for_one_sequence(tiny_llama_dir, llm):
    per_block = _block_bytes(tiny_llama_dir)
    needed = MAX_LEN // 16
    with pytest.raises(ValueError, match="kv_cache_memory"):
        make_llm(tiny_llama_dir, kv_cache_memory=(needed - 1) * per_block)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        make_llm(tiny_llama_dir, kv_cache_memory=per_block - 1)  # not even one block
    # Exactly one max_model_len sequence fits: it runs to the end, and so do others, in turn.
    small = make_llm(tiny_llama_dir, kv_cache_memory=needed * per_block)
    engine = small.llm_engine
    assert engine.num_total_blocks == needed
    prompts = [ids(MAX_LEN - 40), ids(100), ids(60)]
    outputs = small.generate([{"prompt_token_ids": p} for p in prompts], greedy(40), use_tqdm=False)
    for p, o in zip(prompts, outputs):
        assert o.outputs[0].token_ids == reference(llm, p, 40)
    engine.check_integrity()
    assert engine.num_used_blocks == 0


def test_log_steps(tiny_llama_dir, capsys):
    logged = make_llm(tiny_llama_dir, log_steps=True)
    capsys.readouterr()
    logged.generate([{"prompt_token_ids": ids(20)}, {"prompt_token_ids": ids(40)}], greedy(4), use_tqdm=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step")]
    assert len(lines) == logged.llm_engine.num_steps
    counts = []
    for line in lines:
        assert "prefill" in line and "decode" in line
        m = re.search(r"prefill\s+(\d+)\s+decode\s+(\d+)", line)
        assert m, line
        counts.append((int(m.group(1)), int(m.group(2))))
    assert counts == [(2, 0), (0, 2), (0, 2), (0, 2)]

    # Without log_steps, nothing is printed.
    quiet = make_llm(tiny_llama_dir)
    capsys.readouterr()
    quiet.generate({"prompt_token_ids": ids(10)}, greedy(3), use_tqdm=False)
    assert capsys.readouterr().err == ""
