"""Sampling: SamplingParams validation, the Sampler on hand-made logits, and the engine end to end."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tokenmill.entrypoints.llm import LLM
from tokenmill.errors import ParamError
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.sampler import Sampler, SamplingRow, _apply_penalties

# ---- SamplingParams validation ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids"),
])
def test_invalid_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(ParamError, match=rf"^{field}\b") as e:  # a ValueError that carries the field
        SamplingParams(**kwargs)
    assert e.value.param == field


@pytest.mark.parametrize("kwargs", [
    dict(n=3), dict(temperature=0.0), dict(top_p=1.0), dict(top_p=0.01), dict(top_k=-1), dict(top_k=1),
    dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=0.5), dict(presence_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(max_tokens=None), dict(max_tokens=1), dict(min_tokens=4, max_tokens=4),
    dict(min_tokens=100, max_tokens=None), dict(logprobs=0), dict(stop="x"), dict(stop_token_ids=[0]),
])
def test_valid_params_accepted(kwargs):
    SamplingParams(**kwargs)


def test_params_normalisation():
    p = SamplingParams(stop="abc", stop_token_ids=None)
    assert p.stop == ["abc"] and p.stop_token_ids == []
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert g.greedy and (g.top_p, g.top_k, g.min_p) == (1.0, -1, 0.0)
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties
    # clone re-validates.
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams().clone(top_k=0)
    assert SamplingParams().clone(all_stop_token_ids=frozenset({2})).all_stop_token_ids == {2}


# ---- Sampler on hand-made logits ----------------------------------------------------------------

N = 4000  # rows drawn at once for the statistical tests


def _row(params: SamplingParams, prompt=(), output=(), generator=None) -> SamplingRow:
    return SamplingRow(params, generator, list(prompt), list(output))


def _draw(probs: list[float], params: SamplingParams, n: int = N, seed: int = 0) -> Counter:
    logits = torch.tensor(probs).log().expand(n, -1).clone()
    out = Sampler(seed)(logits, [_row(params)] * n)
    assert len(out.token_ids) == n
    return Counter(out.token_ids)


def _assert_freqs(counts: Counter, expected: dict[int, float], tol: float = 0.04) -> None:
    total = sum(counts.values())
    assert set(counts) == set(expected), (counts, expected)
    for tok, p in expected.items():
        assert abs(counts[tok] / total - p) < tol, (tok, counts[tok] / total, p)


def test_unrestricted_sampling_follows_the_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    _assert_freqs(_draw(probs, SamplingParams(temperature=1.0)), dict(enumerate(probs)))


def test_temperature_sharpens_and_flattens():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for t in (0.5, 2.0):
        expected = (probs.log() / t).softmax(-1).tolist()
        _assert_freqs(_draw(probs.tolist(), SamplingParams(temperature=t)), dict(enumerate(expected)))


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(3))
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=5, top_p=0.1),
                   SamplingParams(temperature=1e-6)):
        out = Sampler(0)(logits, [_row(params)] * 64)
        assert out.token_ids == logits.argmax(-1).tolist()
    # A greedy row mixed with sampling rows (the slow path) is still the argmax.
    rows = [_row(SamplingParams(temperature=1.0)), _row(SamplingParams(temperature=0.0))] * 32
    out = Sampler(0)(logits, rows)
    assert out.token_ids[1::2] == logits[1::2].argmax(-1).tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 2.5, 0.0, 1.0, -2.0])
    probs = logits.softmax(-1).tolist()
    counts = _draw(probs, SamplingParams(temperature=1.0, top_k=3))
    kept = [1, 4, 3]
    z = sum(probs[i] for i in kept)
    _assert_freqs(counts, {i: probs[i] / z for i in kept})
    assert set(_draw(probs, SamplingParams(temperature=1.0, top_k=1), n=500)) == {1}
    # top_k larger than the vocabulary keeps everything.
    assert set(_draw(probs, SamplingParams(temperature=1.0, top_k=100))) == set(range(8))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Token order deliberately not sorted by probability.
    probs = [0.05, 0.3, 0.15, 0.5]
    cases = {0.45: [3], 0.7: [3, 1], 0.85: [3, 1, 2], 0.99: [3, 1, 2, 0]}
    for top_p, kept in cases.items():
        counts = _draw(probs, SamplingParams(temperature=1.0, top_p=top_p))
        z = sum(probs[i] for i in kept)
        _assert_freqs(counts, {i: probs[i] / z for i in kept})


def test_top_p_applies_to_what_top_k_kept():
    probs = [0.4, 0.3, 0.2, 0.1]
    # top_k=2 renormalises to [4/7, 3/7]; the first token alone reaches 0.5.
    assert set(_draw(probs, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))) == {0}
    _assert_freqs(_draw(probs, SamplingParams(temperature=1.0, top_p=0.5)), {0: 4 / 7, 1: 3 / 7})


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = [0.05, 0.3, 0.15, 0.5]
    for min_p, kept in ((0.2, [3, 1, 2]), (0.5, [3, 1]), (0.9, [3])):
        counts = _draw(probs, SamplingParams(temperature=1.0, min_p=min_p))
        z = sum(probs[i] for i in kept)
        _assert_freqs(counts, {i: probs[i] / z for i in kept})


def test_rows_with_different_params_in_one_batch():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.7),
              SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0)]
    rows = [_row(p) for p in params] * 1000
    out = Sampler(1)(probs.log().expand(len(rows), -1).clone(), rows)
    by_kind = [set(out.token_ids[i::len(params)]) for i in range(len(params))]
    assert by_kind == [{3}, {1, 3}, {1, 3}, {3}, {0, 1, 2, 3}]


def test_apply_penalties_exact_values():
    base = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    prompt, output = [0, 1], [2, 3, 3]

    def apply(**kw):
        logits = base.clone()
        _apply_penalties(logits, [_row(SamplingParams(**kw), prompt, output)])
        return logits[0].tolist()

    # Repetition: prompt and output tokens alike; positive logits divided, negative multiplied.
    assert apply(repetition_penalty=2.0) == [1.0, -4.0, 0.5, -2.0, 0.5, 3.0]
    assert apply(repetition_penalty=0.5) == [4.0, -1.0, 2.0, -0.5, 0.5, 3.0]
    # Presence: once for any token in the output (not the prompt).
    assert apply(presence_penalty=0.5) == [2.0, -2.0, 0.5, -1.5, 0.5, 3.0]
    # Frequency: times the count in the output.
    assert apply(frequency_penalty=0.25) == [2.0, -2.0, 0.75, -1.5, 0.5, 3.0]
    assert apply(frequency_penalty=-1.0) == [2.0, -2.0, 2.0, 1.0, 0.5, 3.0]
    # All together: repetition first, then presence and frequency.
    assert apply(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25) == \
        [1.0, -4.0, 0.5 - 0.5 - 0.25, -2.0 - 0.5 - 0.5, 0.5, 3.0]
    # No penalties: untouched.
    assert apply() == base[0].tolist()


def test_apply_penalties_per_row():
    base = torch.tensor([[1.0, 1.0, 1.0]] * 3)
    logits = base.clone()
    rows = [_row(SamplingParams(presence_penalty=1.0), [], [0]),
            _row(SamplingParams(), [], [0, 1]),
            _row(SamplingParams(frequency_penalty=1.0), [2], [1, 1])]
    _apply_penalties(logits, rows)
    assert logits.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0]]


@pytest.mark.parametrize("kw", [dict(repetition_penalty=2.0), dict(presence_penalty=1.5),
                                dict(frequency_penalty=0.5)])
def test_penalised_token_loses_greedy_argmax(kw):
    logits = torch.tensor([[0.0, 2.0, 1.5, -1.0]])
    plain = SamplingParams(temperature=0.0)
    # Token 1 was generated twice: penalised, it drops below token 2.
    assert Sampler(0)(logits, [_row(plain, [3], [1, 1])]).token_ids == [1]
    assert Sampler(0)(logits, [_row(plain.clone(**kw), [3], [1, 1])]).token_ids == [2]
    # A token that has not appeared is not penalised.
    assert Sampler(0)(logits, [_row(plain.clone(**kw), [3], [2, 0])]).token_ids == [1]


def test_repetition_penalty_counts_prompt_tokens():
    logits = torch.tensor([[0.0, 2.0, 1.5, -1.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler(0)(logits, [_row(params, [1], [])]).token_ids == [2]
    # Presence and frequency only look at the output.
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert Sampler(0)(logits, [_row(params, [1, 1, 1], [])]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_token_ids():
    eos, stop = 2, 5
    logits = torch.zeros(1, 8)
    logits[0, eos], logits[0, stop], logits[0, 6] = 10.0, 9.0, 1.0
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop]).clone(
        all_stop_token_ids=frozenset({eos}))
    for n_out in range(3):  # masked while fewer than min_tokens outputs
        assert Sampler(0)(logits, [_row(greedy, [7], [0] * n_out)]).token_ids == [6]
    assert Sampler(0)(logits, [_row(greedy, [7], [0] * 3)]).token_ids == [eos]
    # ignore_eos: EOS is not a stop token, so it is not masked; stop_token_ids still are.
    ign = greedy.clone(ignore_eos=True)
    assert Sampler(0)(logits, [_row(ign, [7], [])]).token_ids == [eos]
    ign_logits = logits.clone()
    ign_logits[0, eos] = 0.0
    assert Sampler(0)(ign_logits, [_row(ign, [7], [])]).token_ids == [6]
    # Sampling rows never draw a masked token either.
    sampling = greedy.clone(temperature=1.0)
    flat = torch.zeros(N, 8)
    out = Sampler(0)(flat, [_row(sampling, [7], [1])] * N)
    assert set(out.token_ids) == {0, 1, 3, 4, 6, 7}
    out = Sampler(0)(flat, [_row(sampling, [7], [1, 1, 1])] * N)
    assert set(out.token_ids) == set(range(8))


def test_logprobs_are_raw_and_include_sampled_and_top_n():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 50, generator=gen) * 3
    raw = torch.log_softmax(logits, -1)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=1.0, logprobs=5),
              SamplingParams(temperature=1.0),  # no logprobs asked
              # Penalised greedy row picks a token outside the raw top-2: still reported, raw values.
              SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1e-3),
              SamplingParams(temperature=2.0, logprobs=4, top_k=3)]
    # The smallest positive logit: divided by 1e-3 it becomes the largest.
    prompt4 = [int(torch.where(logits[4] > 0, logits[4], float("inf")).argmin())]
    assert prompt4[0] not in raw[4].topk(2).indices.tolist()
    rows = [_row(p, prompt4 if i == 4 else []) for i, p in enumerate(params)]
    out = Sampler(0)(logits, rows)
    assert out.logprobs[3] is None
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        tok, entry = out.token_ids[i], out.logprobs[i]
        top = raw[i].topk(p.logprobs).indices.tolist()
        assert set(entry) == {tok, *top}
        for t, lp in entry.items():
            assert lp == pytest.approx(raw[i, t].item(), abs=1e-6)
    assert out.token_ids[0] == int(raw[0].argmax())
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert out.token_ids[4] == prompt4[0] and len(out.logprobs[4]) == 3
    assert out.token_ids[5] in raw[5].topk(3).indices.tolist()


def test_seeded_row_independent_of_batch():
    vocab = 1000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, seed=42)

    def run(batch_maker, steps=20, sampler_seed=0):
        sampler = Sampler(sampler_seed)
        gen = torch.Generator().manual_seed(42)
        tokens = []
        for step in range(steps):
            rows, pos = batch_maker(step, _row(params, generator=gen))
            out = sampler(logits.expand(len(rows), -1).clone(), rows)
            tokens.append(out.token_ids[pos])
        return tokens

    alone = run(lambda step, r: ([r], 0))

    def crowded(step, r):
        others = [_row(SamplingParams(temperature=1.0))] * (step % 5 + 1)
        greedy = [_row(SamplingParams(temperature=0.0))] * 2
        other_seeded = [_row(SamplingParams(temperature=0.7, top_k=50, seed=1),
                             generator=torch.Generator().manual_seed(step))]
        rows = others + greedy + [r] + other_seeded
        return rows, len(others) + 2

    assert run(crowded, sampler_seed=123) == alone
    assert run(lambda step, r: ([r] + [_row(SamplingParams(temperature=1.0))] * 7, 0), sampler_seed=9) == alone
    assert len(set(alone)) > 5  # it really samples
    # A different seed gives a different sequence.
    gen = torch.Generator().manual_seed(43)
    other = [Sampler(0)(logits.clone(), [_row(params, generator=gen)]).token_ids[0] for _ in range(20)]
    assert other != alone


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(64, 1000)
    rows = [_row(SamplingParams(temperature=1.0))] * 64
    a = Sampler(7)(logits, rows).token_ids
    assert Sampler(7)(logits, rows).token_ids == a
    assert Sampler(8)(logits, rows).token_ids != a
    assert len(set(a)) > 40


# ---- engine end to end (tiny random-weight model) -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=16 << 20)


def _prompt(seed: int, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(100, 49000, (length,), generator=g).tolist()}


def _generate(llm: LLM, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.num_used_blocks == 0
    return outs


_GREEDY_CACHE: dict = {}


def _greedy(llm: LLM, prompt: dict, max_tokens: int) -> list[int]:
    key = (id(llm), tuple(prompt["prompt_token_ids"]), max_tokens)
    if key not in _GREEDY_CACHE:
        out = _generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        _GREEDY_CACHE[key] = out[0].outputs[0].token_ids
    ids = _GREEDY_CACHE[key]
    assert len(ids) == max_tokens
    return list(ids)


def _fresh_token(ids: list[int], limit: int = 6) -> tuple[int, int]:
    """A token of `ids` and its first position: the latest first occurrence before `limit`."""
    first = {}
    for i, t in enumerate(ids[:limit]):
        first.setdefault(t, i)
    tok = max(first, key=first.get)
    return tok, first[tok]


def test_engine_seeded_requests_batch_invariant(tiny_llm):
    a, b, c = _prompt(1), _prompt(2, 13), _prompt(3, 4)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8)
    alone = _generate(tiny_llm, [a], seeded)[0].outputs[0].token_ids
    assert len(alone) == 8
    batch = _generate(tiny_llm, [b, a, c, b, a],
                      [SamplingParams(temperature=1.0, max_tokens=6),
                       seeded,
                       SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=10),
                       SamplingParams(temperature=0.0, max_tokens=4),
                       SamplingParams(temperature=1.0, max_tokens=8)])
    assert batch[1].outputs[0].token_ids == alone
    again = _generate(tiny_llm, [c, a], [SamplingParams(temperature=1.0, max_tokens=3), seeded])
    assert again[1].outputs[0].token_ids == alone
    # The seed matters.
    other = _generate(tiny_llm, [a], seeded.clone(seed=4321))[0].outputs[0].token_ids
    assert other != alone


def test_engine_n_samples(tiny_llm):
    out = _generate(tiny_llm, [_prompt(4)], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6))[0]
    assert [o.index for o in out.outputs] == [0, 1]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in out.outputs)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    again = _generate(tiny_llm, [_prompt(4)], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    greedy = _generate(tiny_llm, [_prompt(4)], SamplingParams(n=3, temperature=0.0, max_tokens=5))[0]
    assert [o.index for o in greedy.outputs] == [0, 1, 2]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == greedy.outputs[2].token_ids


def test_engine_max_tokens_length(tiny_llm):
    out = _generate(tiny_llm, [_prompt(5)], SamplingParams(temperature=1.0, max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None and len(out.token_ids) == 5
    out = _generate(tiny_llm, [_prompt(5)], SamplingParams(temperature=0.0, max_tokens=1))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1


def test_engine_stop_token_ids(tiny_llm):
    prompt = _prompt(6)
    greedy = _greedy(tiny_llm, prompt, 10)
    tok, pos = _fresh_token(greedy)
    out = _generate(tiny_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10,
                                                        stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == greedy[:pos + 1]
    assert out.token_ids[-1] == tok
    assert out.finish_reason == "stop" and out.stop_reason == tok
    # The stop token's text is left out, as vLLM: the text is that of the tokens before it.
    tokenizer = tiny_llm.get_tokenizer()
    assert out.text == tokenizer.decode(greedy[:pos], skip_special_tokens=True)


def test_engine_eos_and_ignore_eos(tiny_llm):
    """Make a token the greedy run is known to produce the model's EOS, then check both behaviours."""
    engine = tiny_llm.llm_engine
    assert engine.eos_token_ids == {2}
    prompt = _prompt(6)
    greedy = _greedy(tiny_llm, prompt, 10)
    tok, pos = _fresh_token(greedy)
    saved = engine.eos_token_ids
    engine.eos_token_ids = {tok}
    try:
        out = _generate(tiny_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
        assert out.token_ids == greedy[:pos + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None  # EOS: no stop_reason, as vLLM
        out = _generate(tiny_llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10,
                                                            ignore_eos=True))[0].outputs[0]
        assert out.token_ids == greedy  # went on past the EOS at `pos`
        assert out.token_ids[pos] == tok and pos < 6
        assert out.finish_reason == "length" and len(out.token_ids) == 10
    finally:
        engine.eos_token_ids = saved


@pytest.mark.parametrize("how", ["eos", "stop_token_ids"])
def test_engine_min_tokens(tiny_llm, how):
    engine = tiny_llm.llm_engine
    prompt = _prompt(6)
    greedy = _greedy(tiny_llm, prompt, 10)
    tok, pos = _fresh_token(greedy)
    min_tokens = pos + 3
    params = SamplingParams(temperature=0.0, max_tokens=min_tokens + 3, min_tokens=min_tokens)
    saved = engine.eos_token_ids
    if how == "eos":
        engine.eos_token_ids = {tok}
    else:
        params = params.clone(stop_token_ids=[tok])
    try:
        out = _generate(tiny_llm, [prompt], params)[0].outputs[0]
    finally:
        engine.eos_token_ids = saved
    ids = out.token_ids
    assert ids[:pos] == greedy[:pos]  # identical until the masked token would have come
    assert len(ids) >= min_tokens
    assert tok not in ids[:min_tokens]
    if out.finish_reason == "stop":
        assert ids[-1] == tok and tok not in ids[:-1]
        assert out.stop_reason == (tok if how == "stop_token_ids" else None)
    else:
        assert out.finish_reason == "length" and len(ids) == min_tokens + 3 and tok not in ids
    # Sampling too: no stop token before min_tokens.
    params = params.clone(temperature=1.0, seed=0, max_tokens=min_tokens + 1)
    if how == "eos":
        engine.eos_token_ids = {tok}
    try:
        outs = _generate(tiny_llm, [prompt] * 3, params)
    finally:
        engine.eos_token_ids = saved
    for o in outs:
        assert len(o.outputs[0].token_ids) >= min_tokens and tok not in o.outputs[0].token_ids[:min_tokens]


def test_engine_logprobs(tiny_llm):
    out = _generate(tiny_llm, [_prompt(9)], SamplingParams(temperature=1.0, seed=2, max_tokens=5,
                                                            logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) in (3, 4)
        assert all(v <= 0.0 for v in entry.values())
        assert sum(math.exp(v) for v in entry.values()) <= 1.0 + 1e-5
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(out.logprobs, out.token_ids)))
    plain = _generate(tiny_llm, [_prompt(9)], SamplingParams(max_tokens=2))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


# ---- stop strings (real model: real text) -------------------------------------------------------


@pytest.fixture(scope="module")
def real_llm(default_model_dir):
    return LLM(str(default_model_dir), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)


def test_engine_stop_strings(real_llm):
    tok = real_llm.get_tokenizer()
    prompt = "The capital of France is"
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # Reference greedy run; a stop string that never shows up changes nothing.
    g = _generate(real_llm, prompt, base.clone(stop="@@never@@"))[0].outputs[0]
    assert g.finish_reason == "length" and g.stop_reason is None and len(g.token_ids) == 12
    text = g.text
    assert text == tok.decode(g.token_ids, skip_special_tokens=True)
    # Character offsets where each token's text ends.
    ends = [len(tok.decode(g.token_ids[:i + 1], skip_special_tokens=True)) for i in range(len(g.token_ids))]
    # A stop string that straddles a token boundary in the middle of the output.
    boundary = next(e for e in ends if e >= len(text) // 3 and 2 <= e <= len(text) - 2)
    stop = text[boundary - 2: boundary + 2]
    first = text.find(stop)
    out = _generate(real_llm, prompt, base.clone(stop=[stop]))[0].outputs[0]
    assert out.text == text[:first]  # cut before the stop string
    assert out.finish_reason == "stop" and out.stop_reason == stop
    n_tokens = next(i + 1 for i, e in enumerate(ends) if e >= first + len(stop))
    assert out.token_ids == g.token_ids[:n_tokens]  # stopped at the token completing it

    # Several stop strings: the one found earliest in the text wins, whatever the list order.
    late = text[ends[-2]:]
    assert late and text.find(late) > first
    out = _generate(real_llm, prompt, base.clone(stop=[late, "@@never@@", stop]))[0].outputs[0]
    assert out.text == text[:first] and out.stop_reason == stop and out.finish_reason == "stop"
