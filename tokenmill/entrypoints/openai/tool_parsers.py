"""Tool calls out of generated text, whole or as it streams, for each model family's format.

    hermes       Qwen2.5 / Hermes:  text <tool_call>{"name": "f", "arguments": {...}}</tool_call> ...
    llama3_json  Llama 3.x:         [<|python_tag|>]{"name": "f", "parameters": {...}}; {...}
    mistral      Mistral:           text [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
    required     tool_choice "required" (constrained, see required_schema): [{"name", "arguments"}, ...]

A call's `arguments` is the raw JSON text of its arguments object as the model wrote it, found by
a scanner that knows where a JSON value ends, so a stream can send it in pieces as it grows and
the pieces add up to exactly what the whole-text parse returns.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ParsedCall:
    name: str | None  # None until its text is complete
    arguments: str  # the arguments' JSON text so far (all of it once `complete`)
    complete: bool


@dataclass
class ParsedOutput:
    content: str  # text outside the tool calls (what is safe to show so far, while streaming)
    calls: list[ParsedCall]


def value_end(text: str, start: int) -> int | None:
    """The end (exclusive) of the JSON value starting at text[start], or None if it is incomplete."""
    if start >= len(text):
        return None
    first = text[start]
    if first not in "{[\"":
        m = re.match(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null", text[start:])
        return start + m.end() if m and start + m.end() < len(text) else None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(arguments|parameters)"\s*:\s*')


def parse_call(raw: str) -> ParsedCall:
    """One call object's text (maybe incomplete): its name once known and its arguments so far."""
    end = value_end(raw, _skip_ws(raw, 0))
    if end is not None:
        try:
            obj = json.loads(raw[:end])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = _ARGS.search(raw)
            if args is not None:
                a_start = _skip_ws(raw, args.end())
                a_end = value_end(raw, a_start)
                text = raw[a_start:a_end] if a_end is not None else json.dumps(obj.get(args.group(1)))
            else:
                text = "{}"
            return ParsedCall(obj["name"], text, True)
        return ParsedCall(None, "", True)
    name = _NAME.search(raw)
    args = _ARGS.search(raw)
    if name is None or args is None or args.start() < name.start():
        return ParsedCall(None, "", False)  # the name comes first, or the call is sent whole at its end
    a_start = _skip_ws(raw, args.end())
    a_end = value_end(raw, a_start)
    text = raw[a_start:] if a_end is None else raw[a_start:a_end]
    if not text.startswith("{"):
        text = ""  # a non-object value: sent once complete
    return ParsedCall(json.loads(f'"{name.group(1)}"'), text, False)


def _objects(text: str, start: int, sep: str) -> list[ParsedCall]:
    """Call objects from `start` on, separated by `sep` (and whitespace), the last maybe incomplete."""
    calls, i = [], _skip_ws(text, start)
    while i < len(text) and text[i] == "{":
        end = value_end(text, i)
        calls.append(parse_call(text[i:] if end is None else text[i:end]))
        if end is None:
            break
        i = _skip_ws(text, end)
        if i < len(text) and text[i] in sep:
            i = _skip_ws(text, i + 1)
        else:
            break
    return [c for c in calls if c.name is not None or not c.complete]


def _held_marker(text: str, marker: str) -> int:
    """How many trailing characters of text could be the start of marker (held back in a stream)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def parse_hermes(text: str, final: bool) -> ParsedOutput:
    start = text.find("<tool_call>")
    if start < 0:
        held = 0 if final else _held_marker(text, "<tool_call>")
        return ParsedOutput(text[:len(text) - held], [])
    calls, i = [], start
    while i >= 0:
        body_start = i + len("<tool_call>")
        close = text.find("</tool_call>", body_start)
        body = text[body_start:] if close < 0 else text[body_start:close]
        call = parse_call(body)
        if close >= 0 and not call.complete:
            call = ParsedCall(None, "", True)
        if call.name is not None or not call.complete:
            calls.append(call)
        if close < 0:
            break
        i = text.find("<tool_call>", close)
    return ParsedOutput(text[:start] if calls else text, calls)


def parse_llama3_json(text: str, final: bool) -> ParsedOutput:
    if not final and "<|python_tag|>".startswith(text):
        return ParsedOutput("", [])
    body = text.removeprefix("<|python_tag|>")
    i = _skip_ws(body, 0)
    if i >= len(body):
        return ParsedOutput("" if not final else text, [])
    if body[i] != "{":
        return ParsedOutput(text, [])
    calls = _objects(body, i, ";")
    if final and not calls:
        return ParsedOutput(text, [])
    return ParsedOutput("", calls)


def _array(text: str, start: int) -> list[ParsedCall]:
    i = _skip_ws(text, start)
    if i >= len(text) or text[i] != "[":
        return []
    return _objects(text, i + 1, ",")


def parse_mistral(text: str, final: bool) -> ParsedOutput:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        held = 0 if final else _held_marker(text, "[TOOL_CALLS]")
        return ParsedOutput(text[:len(text) - held], [])
    return ParsedOutput(text[:start], _array(text, start + len("[TOOL_CALLS]")))


def parse_required(text: str, final: bool) -> ParsedOutput:
    return ParsedOutput("", _array(text, 0))


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral,
           "required": parse_required}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of tool_choice "required": a list of one call (or more, if parallel) of the
    given tools, each {"name": its name, "arguments": an object of its parameters' schema}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                 "arguments": t.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": options[0] if len(options) == 1 else {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolCallStream:
    """What one streamed choice has sent of its tool calls: feed it the whole text so far, get the
    new content and (index, name once, argument piece) deltas."""

    def __init__(self, parse) -> None:
        self.parse = parse
        self.sent_content = 0
        self.sent_names: set[int] = set()
        self.sent_args: dict[int, int] = {}

    def advance(self, text: str, final: bool) -> tuple[str, list[tuple[int, str | None, str]]]:
        parsed = self.parse(text, final)
        content = parsed.content[self.sent_content:]
        self.sent_content = max(self.sent_content, len(parsed.content))
        deltas = []
        for i, call in enumerate(parsed.calls):
            if call.name is None:
                continue
            name = None if i in self.sent_names else call.name
            self.sent_names.add(i)
            sent = self.sent_args.get(i, 0)
            piece = call.arguments[sent:]
            self.sent_args[i] = len(call.arguments)
            if name is not None or piece:
                deltas.append((i, name, piece))
        return content, deltas
