"""The tool-call parsers on known texts: whole-text results, and streams (fed a character at a
time) whose pieces add up to exactly the whole-text parse."""
from __future__ import annotations

import json

import pytest

from tokenmill.entrypoints.openai.tool_parsers import PARSERS, ToolCallStream, parse_call, value_end

CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "a}\\"b"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris", "days": [1, 2]}), ("get_time", {"tz": 'a}"b'})]),
    ("hermes", "no tools here <tool", "no tools here <tool", []),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": {"c": null}}}; '
                    '{"name": "neg", "parameters": {"x": -2.5}}',
     "", [("add", {"a": 1, "b": {"c": None}}), ("neg", {"x": -2.5})]),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    ("mistral", 'Sure [TOOL_CALLS][{"name": "f", "arguments": {"q": "[x]"}}, {"name": "g", "arguments": {}}]',
     "Sure ", [("f", {"q": "[x]"}), ("g", {})]),
    ("required", '[{"name": "f", "arguments": {"k": true}}]', "", [("f", {"k": True})]),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_whole_text(parser, text, content, calls):
    parsed = PARSERS[parser](text, True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert all(c.complete for c in parsed.calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_stream_adds_up_to_whole_text(parser, text, content, calls):
    stream = ToolCallStream(PARSERS[parser])
    sent_content, names, args = "", {}, {}
    for end in range(1, len(text) + 1):
        new, deltas = stream.advance(text[:end], end == len(text))
        sent_content += new
        for i, name, piece in deltas:
            if name is not None:
                assert i not in names
                names[i] = name
            args[i] = args.get(i, "") + piece
    whole = PARSERS[parser](text, True)
    assert sent_content == whole.content
    assert [names[i] for i in sorted(names)] == [c.name for c in whole.calls]
    assert [args[i] for i in sorted(args)] == [c.arguments for c in whole.calls]


def test_value_end_and_incomplete_calls():
    assert value_end('{"a": "}"} tail', 0) == 10
    assert value_end('{"a": [1, 2', 0) is None
    assert value_end("12, ", 0) == 2
    partial = parse_call('{"name": "f", "arguments": {"x": [1, ')
    assert (partial.name, partial.arguments, partial.complete) == ("f", '{"x": [1, ', False)
    assert parse_call('{"arguments": {"x": 1}, "na').name is None  # arguments first: sent whole at the end
