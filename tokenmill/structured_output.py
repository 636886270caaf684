"""Structured outputs with xgrammar: compile a request's constraint once, then mask and advance.

    add_request --spec--> GrammarCache.compile()  (LRU of futures, keyed by (kind, text), 2 threads)
                          the request waits (WAITING_FOR_GRAMMAR, no batch slot) until it is done
    each step, sampler:   RequestGrammar.fill_bitmask -> apply_token_bitmask_inplace on float32 logits
                          (before penalties, temperature, top-k, top-p) -> sample -> accept(token)
    a matcher that accepts its stop token has reached its end: the request finishes ("stop").

A matcher's state is a function of the request's output tokens, which preemption keeps (recompute
recomputes their KV, swap moves it), so it needs no replay; the model runner's thread is the only
one that touches it once the request is scheduled.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from tokenmill.errors import ParamError
from tokenmill.sampling_params import StructuredOutputsParams

PARAM = "structured_outputs"

# JSON-schema keywords xgrammar does not enforce (it would accept outputs that break them): a
# schema using one is refused rather than honoured in part.
_UNSUPPORTED_KEYWORDS = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
                         "allOf", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then", "else",
               "additionalItems", "unevaluatedItems", "unevaluatedProperties")


def check_json_schema(schema: Any, path: str = "") -> None:
    """Raise ParamError if `schema` is not a valid JSON schema or uses a keyword xgrammar cannot
    enforce (named with where it sits)."""
    import jsonschema

    if not path:
        if not isinstance(schema, (dict, bool)):
            raise ParamError(PARAM, f"the JSON schema must be an object, got {type(schema).__name__}")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise ParamError(PARAM, f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}") from None
    if not isinstance(schema, dict):
        return
    for key in _UNSUPPORTED_KEYWORDS:
        if key in schema and not (key == "uniqueItems" and schema[key] is False):
            raise ParamError(PARAM, f"the JSON schema keyword {key!r} (at {path or '/'}) is not supported")
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_json_schema(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_json_schema(sub, f"{path}/{key}/{i}")
    for key in _SCHEMA_ONE:
        if isinstance(schema.get(key), dict):
            check_json_schema(schema[key], f"{path}/{key}")


def _clean(e: Exception) -> str:
    """xgrammar's message without its C++ source location ('[17:22:14] /project/cpp/x.cc:94: ')."""
    text = str(e).strip()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return text.removeprefix("Check failed: (error.empty()) is false: ").strip()


# xgrammar (0.2.9) writes the characters of a string with minLength / maxLength as [^"\\\r\n]: that
# admits the raw control characters JSON forbids inside strings (a random model sampled U+0015 and
# json.loads refused the output). Its unbounded strings already exclude \0-\x1f, as these now do.
_BOUNDED_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\]'


def json_schema_grammar(text: str):
    """xgrammar's grammar of a JSON schema (compact: no whitespace beyond `": "` and `, `), with
    every string character one JSON allows unescaped."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS))


class GrammarCache:
    """Compiled grammars by (kind, text), least recently used dropped past `max_size`. Compiles run
    on a pool of `num_threads` threads; compile() never blocks."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_size: int = 128,
                 num_threads: int = 2) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        # NOTE: xgrammar's own cache is off: this one is keyed the same and bounded by entries.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenmill-grammar")
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self.max_size = max_size

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future of the spec's compiled grammar; its exception is a ParamError naming the fault."""
        key = spec.key
        with self._lock:
            future = self._entries.get(key)
            if future is not None and not future.cancelled():
                self._entries.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, *key)
            self._entries[key] = future
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
            return future

    def compile_now(self, spec: StructuredOutputsParams, timeout: float | None):
        """Wait for the spec's grammar; a bad spec, or one that takes longer than `timeout` seconds,
        raises ParamError."""
        try:
            return self.compile(spec).result(timeout)
        except FutureTimeout:
            raise ParamError(PARAM, f"compiling the {spec.key[0]} constraint took longer than "
                                    f"{timeout:g} s") from None

    def _compile(self, kind: str, text: str):
        import xgrammar as xgr

        try:
            if kind == "json":
                schema = json.loads(text)
                check_json_schema(schema)
                return self._compiler.compile_grammar(json_schema_grammar(text))
            if kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return self._compiler.compile_regex(text)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text))
                return self._compiler.compile_grammar(xgr.Grammar.from_ebnf(f"root ::= {alternatives}"))
            return self._compiler.compile_grammar(xgr.Grammar.from_ebnf(text))
        except ParamError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
            what = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[kind]
            raise ParamError(PARAM, f"invalid {what}: {_clean(e)}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's position in its grammar (an xgrammar matcher)."""

    def __init__(self, compiled) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.done = False  # reached its end (accepted a stop token) or was given a token it rejects

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; True when the grammar has reached its end with it."""
        if not self.matcher.accept_token(token_id) or self.matcher.is_terminated():
            self.done = True
        return self.done


def apply_grammars(logits: torch.Tensor, grammars: list[RequestGrammar | None]) -> None:
    """Mask, in place, every token that the row's grammar does not allow next (float32 logits, one
    row per entry of `grammars`; None or finished grammars leave their row as it is)."""
    import xgrammar as xgr

    rows = [i for i, g in enumerate(grammars) if g is not None and not g.done]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
