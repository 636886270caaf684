"""Structured outputs (xgrammar) on the tiny random Llama, which writes garbage unless constrained:
every constrained output must parse and validate, its neighbours must not change, and it must hold
under n > 1, stop strings, preemption, overlap scheduling and prefix caching."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch
from helpers import TokenIds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.errors import ParamError
from tokenmill.request import RequestStatus
from tokenmill.worker.kv_cache import kv_bytes_per_block

ids = TokenIds(13)
MAX_LEN = 256

SCHEMAS = [
    # nested arrays of objects, enums, bounded numbers, required and optional keys
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "pets": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                             "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
            "required": ["kind"]}}},
     "required": ["name", "age", "tags"]},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "array", "maxItems": 2,
                                                              "items": {"type": "boolean"}}},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"},
                                      "choice": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3},
                                                           {"const": "none"}]}},
     "required": ["ok", "choice"]},
    {"enum": ["alpha", "beta", 7, None]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                      "required": ["x"]}},
     "type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 3},
]


def _block_bytes(model_dir) -> int:
    return kv_bytes_per_block(AutoConfig.from_pretrained(model_dir), 16, torch.float32)


def make_llm(model_dir, **kw) -> LLM:
    args = dict(dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=96 * _block_bytes(model_dir))
    args.update(kw)
    return LLM(str(model_dir), **args)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return make_llm(tiny_llama_dir, async_scheduling=False)


def constrained(**spec) -> SamplingParams:
    kw = {k: spec.pop(k) for k in ("temperature", "seed", "n", "stop", "max_tokens") if k in spec}
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 160)
    return SamplingParams(structured_outputs=StructuredOutputsParams(**spec), **kw)


def texts(outputs) -> list[list[tuple[str, str]]]:
    return [[(c.text, c.finish_reason) for c in o.outputs] for o in outputs]


def test_unconstrained_model_writes_garbage(llm):
    out = llm.generate(ids(5), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    with pytest.raises(ValueError):
        json.loads(out[0].outputs[0].text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, temperature):
    params = [constrained(json=s, temperature=temperature, seed=i) for i, s in enumerate(SCHEMAS)]
    outputs = llm.generate([ids(6) for _ in SCHEMAS], params, use_tqdm=False)
    for schema, out in zip(SCHEMAS, outputs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason is None
        jsonschema.validate(json.loads(c.text), schema)
        assert c.token_ids[-1] in llm.llm_engine.eos_token_ids  # the grammar's end is its stop token
    llm.llm_engine.check_integrity()
    assert llm.llm_engine.num_used_blocks == 0


def _bounded_schema():
    """JSON schemas a random model must finish: every string, array and number bounded."""
    leaves = st.one_of(
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(0, 100)),
        st.just({"type": "boolean"}),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.lists(st.sampled_from(["a", "b", "zz", 1, True, None]), min_size=1, max_size=4, unique=True)
        .map(lambda v: {"enum": v}))

    def containers(children):
        props = st.dictionaries(st.sampled_from(["k", "v", "id", "item", "x_y"]), children, min_size=1, max_size=3)
        return st.one_of(
            st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)),
            props.flatmap(lambda p: st.sets(st.sampled_from(sorted(p))).map(
                lambda req: {"type": "object", "properties": p, "required": sorted(req)})))

    return st.recursive(leaves, containers, max_leaves=6)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(_bounded_schema(), min_size=6, max_size=6))
def test_generated_schemas_validate(llm, schemas):
    prompts = [ids(4) for _ in schemas]
    outputs = llm.generate(prompts, [constrained(json=s, temperature=1.0, seed=i) for i, s in enumerate(schemas)],
                           use_tqdm=False)
    for schema, out in zip(schemas, outputs):
        assert out.outputs[0].finish_reason == "stop", (schema, out.outputs[0].text)
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_json_object_regex_choice_grammar(llm):
    params = [constrained(json_object=True, max_tokens=40),
              constrained(regex=r"[a-z]{2,5}-\d{3}"),
              constrained(choice=["yes", "no", "it depends"], temperature=1.0, seed=3),
              constrained(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9]', max_tokens=40)]
    outputs = llm.generate([ids(5) for _ in params], params, use_tqdm=False)
    json_text, regex_text, choice_text, grammar_text = (o.outputs[0].text for o in outputs)
    # Any JSON object: its strings are unbounded, so the random model rarely closes them in 40 tokens;
    # whatever it wrote must be the start of a JSON object (xgrammar's own JSON grammar agrees).
    import xgrammar as xgr

    assert json_text.startswith("{")
    if outputs[0].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(json_text), dict)
    checker = xgr.GrammarMatcher(llm.llm_engine.grammar_cache.compile(StructuredOutputsParams(json_object=True)).result())
    assert checker.accept_string(json_text)
    assert re.fullmatch(r"[a-z]{2,5}-\d{3}", regex_text)
    assert choice_text in ("yes", "no", "it depends")
    finish = outputs[3].outputs[0].finish_reason
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)" if finish == "stop" else r"\([1-9](\+[1-9])*", grammar_text)
    assert [o.outputs[0].finish_reason for o in outputs[1:3]] == ["stop"] * 2


def test_unconstrained_neighbours_unchanged(llm):
    """Greedy rows in a batch with constrained ones get exactly the tokens of a batch without them."""
    plain = [ids(n) for n in (7, 12, 20)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(plain, greedy, use_tqdm=False)
    mixed_prompts = [plain[0], ids(6), plain[1], ids(9), plain[2]]
    mixed_params = [greedy, constrained(json=SCHEMAS[0]), greedy, constrained(regex=r"\d{4}"), greedy]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]
    assert re.fullmatch(r"\d{4}", mixed[3].outputs[0].text)


def test_n_samples_each_follow_the_grammar(llm):
    out = llm.generate(ids(5), constrained(regex=r"[a-z]{3}-[0-9]{2}", n=4, temperature=1.0, seed=5),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 4
    assert all(re.fullmatch(r"[a-z]{3}-[0-9]{2}", c.text) and c.finish_reason == "stop" for c in out.outputs)
    assert len({c.text for c in out.outputs}) > 1  # each sample has a matcher of its own


def test_stop_string_cuts_constrained_output(llm):
    prompt = ids(5)
    full = llm.generate(prompt, constrained(regex=r"[a-z]{3}-[0-9]{2}"), use_tqdm=False)[0].outputs[0]
    cut = llm.generate(prompt, constrained(regex=r"[a-z]{3}-[0-9]{2}", stop="-"), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text.split("-")[0] and cut.finish_reason == "stop" and cut.stop_reason == "-"


def _long_mix():
    prompts = [ids(n) for n in (40, 30, 50, 35, 45, 25)]
    params = [constrained(regex=r"[a-z ]{60,80}", max_tokens=120) if i % 2 else
              SamplingParams(temperature=0, max_tokens=60, ignore_eos=True) for i in range(len(prompts))]
    return prompts, params


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_constrained_outputs(tiny_llama_dir, llm, mode):
    prompts, params = _long_mix()
    expected = texts(llm.generate(prompts, params, use_tqdm=False))
    tight = make_llm(tiny_llama_dir, num_kv_blocks=20, preemption_mode=mode, enable_admission_control=False,
                     swap_space=8 * _block_bytes(tiny_llama_dir), async_scheduling=False)
    got = texts(tight.generate(prompts, params, use_tqdm=False))
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    assert all(re.fullmatch(r"[a-z ]{60,80}", got[i][0][0]) for i in (1, 3, 5))
    assert tight.llm_engine.num_used_blocks == 0


def test_overlap_scheduling_and_prefix_caching(tiny_llama_dir, llm):
    prefix = ids(48)  # three full blocks shared by every prompt
    prompts = [prefix + ids(5) for _ in SCHEMAS]
    params = [constrained(json=s) for s in SCHEMAS]
    expected = texts(llm.generate(prompts, params, use_tqdm=False))
    overlap = make_llm(tiny_llama_dir, async_scheduling=True, num_threads=1)
    first = texts(overlap.generate(prompts[:1], params[:1], use_tqdm=False))
    hits = overlap.llm_engine.stats().scheduler.prefix_cache_hits
    assert texts(overlap.generate(prompts, params, use_tqdm=False)) == expected
    assert first == expected[:1]
    assert overlap.llm_engine.stats().scheduler.prefix_cache_hits >= hits + 3 * 16 * (len(SCHEMAS) - 1)
    assert overlap.llm_engine.num_used_blocks == 0


@pytest.mark.parametrize("spec, match", [
    ({"regex": "(("}, "invalid regex: .*parenthesis is not closed"),
    ({"json": {"type": "foo"}}, "invalid JSON schema at type: 'foo' is not valid"),
    ({"json": '{"type": "object"'}, "structured_outputs.json is not valid JSON"),
    ({"json": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}},
     "the JSON schema keyword 'uniqueItems' .at /properties/a. is not supported"),
    ({"grammar": "root ::= missing"}, 'invalid grammar: .*Rule "missing" is not defined'),
    ({"regex": "a", "choice": ["b"]}, "exactly one of json, regex, choice, grammar or json_object"),
    ({"choice": []}, "choice must be a non-empty list"),
])
def test_bad_specs_rejected_before_queueing(llm, spec, match):
    with pytest.raises(ParamError, match=match) as info:
        llm.generate(ids(4), SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert info.value.param == "structured_outputs"
    assert not llm.llm_engine.has_unfinished_requests()


def test_grammar_cache_compiles_each_spec_once(llm):
    cache = llm.llm_engine.grammar_cache
    a = cache.compile(StructuredOutputsParams(regex="x+"))
    assert cache.compile(StructuredOutputsParams(regex="x+")) is a
    assert cache.compile(StructuredOutputsParams(json='{"type": "integer"}')) is \
        cache.compile(StructuredOutputsParams(json={"type": "integer"}))
    assert cache.compile(StructuredOutputsParams(regex="y+")) is not a


def test_waiting_for_grammar_holds_no_slot_and_never_blocks(llm, monkeypatch):
    """While a grammar compiles its request waits outside the scheduler; others run meanwhile."""
    engine = llm.llm_engine
    pending: Future = Future()
    real = engine.grammar_cache.compile
    monkeypatch.setattr(engine.grammar_cache, "compile", lambda spec: pending)
    engine.add_request("slow", ids(5), constrained(regex=r"\d{3}"))
    engine.add_request("plain", ids(5), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    req = engine._requests["slow"]
    assert req.status == RequestStatus.WAITING_FOR_GRAMMAR
    finished = {}
    while "plain" not in finished:
        for out in engine.step():
            finished[out.request_id] = out
        assert req not in engine.scheduler.running and req not in list(engine.scheduler.policy)
    pending.set_result(real(StructuredOutputsParams(regex=r"\d{3}")).result())
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert re.fullmatch(r"\d{3}", finished["slow"].outputs[0].text)
    engine.check_integrity()


def test_compile_timeout_and_failed_compile_in_engine(llm, monkeypatch):
    engine = llm.llm_engine
    never: Future = Future()
    monkeypatch.setattr(engine.grammar_cache, "compile", lambda spec: never)
    monkeypatch.setattr(engine, "config", engine.config.__class__(**{**engine.config.__dict__,
                                                                     "grammar_compile_timeout": 0.05}))
    with pytest.raises(ParamError, match=r"compiling the regex constraint took longer than 0.05 s"):
        llm.generate(ids(4), constrained(regex="a"), use_tqdm=False)
    # Straight to the engine (no check first): a spec that fails to compile ends its request.
    failed: Future = Future()
    failed.set_exception(ParamError("structured_outputs", "invalid regex: boom"))
    monkeypatch.setattr(engine.grammar_cache, "compile", lambda spec: failed)
    engine.add_request("bad", ids(4), constrained(regex="a"))
    outs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs] == \
        [("bad", True, "abort", "invalid regex: boom")]
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 6}, {"type": "string", "minLength": 1},
                                    {"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}},
                                     "required": ["k"]}])
def test_strings_take_no_control_characters(llm, schema):
    """xgrammar alone lets a length-bounded string take U+0000-U+001F (invalid JSON); ours does not."""
    from tokenmill.structured_output import GrammarCache, RequestGrammar

    engine = llm.llm_engine
    cache = GrammarCache(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))
    try:
        compiled = cache.compile_now(StructuredOutputsParams(json=schema), timeout=60)
    finally:
        cache.close()
    opening = '{"k": "' if schema["type"] == "object" else '"'
    for ch in ("\x00", "\x15", "\x1f", "\t"):
        assert not RequestGrammar(compiled).matcher.accept_string(opening + "a" + ch), repr(ch)
    good = RequestGrammar(compiled).matcher
    assert good.accept_string(opening + "ab\u00e9\"" + ("}" if schema["type"] == "object" else ""))
