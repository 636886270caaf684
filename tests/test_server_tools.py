"""Structured outputs, tool calls and the max_tokens caps through a real `tokenmill serve` process
and the official `openai` client, on a tiny random Qwen2 with a Hermes-style chat template that
renders tools (`--tool-call-parser hermes --default-max-tokens 48 --max-tokens-limit 200`)."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from helpers import Server
from test_server import ENGINE_ARGS

TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for call in m.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model_dir(tiny_qwen2_dir, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-qwen2-tools")
    shutil.copytree(tiny_qwen2_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tool_model_dir, tmp_path_factory):
    s = Server(tool_model_dir, tmp_path_factory.mktemp("tools-log") / "server.log", *ENGINE_ARGS, "--tool-call-parser", "hermes",
               "--default-max-tokens", "48", "--max-tokens-limit", "200")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _chat(client, model, stream: bool, **kw):
    """A chat completion, or the stream of one reassembled: (content, tool calls, finish_reason)."""
    if not stream:
        r = client.chat.completions.create(model=model, messages=kw.pop("messages", USER), **kw)
        c = r.choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=kw.pop("messages", USER), stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                if t.id is not None:
                    assert t.index not in calls and t.function.name
                    calls[t.index] = [t.id, t.function.name, ""]
                calls[t.index][2] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


# ---- structured outputs ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, model, stream):
    content, calls, finish = _chat(client, model, stream, temperature=0, max_tokens=150, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}})
    assert finish == "stop" and not calls
    jsonschema.validate(json.loads(content), WEATHER)


def test_structured_outputs_on_completions(client, model):
    r = client.completions.create(model=model, prompt="The code is", max_tokens=20, temperature=1.0, seed=4, n=3,
                                  extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}})
    assert [bool(re.fullmatch(r"[A-Z]{2}-\d{3}", c.text)) for c in r.choices] == [True] * 3
    r = client.completions.create(model=model, prompt="Pick", max_tokens=20,
                                  extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}}, "response_format",
     "response_format: invalid JSON schema at properties/a/type"),
    ("/v1/completions", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs",
     "structured_outputs: invalid regex"),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "array", "contains": {"const": 1}}}},
     "structured_outputs", "structured_outputs: the JSON schema keyword 'contains' (at /) is not supported"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs",
     "structured_outputs: invalid grammar"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "give response_format or structured_outputs, not both"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "tool_choice names the function 'nope'"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "tool_choice 'required' constrains the output itself"),
    ("/v1/chat/completions", {"max_tokens": 201}, "max_tokens", "max_tokens must be at most 200 on this server"),
    ("/v1/chat/completions", {"max_completion_tokens": 500}, "max_completion_tokens",
     "max_completion_tokens must be at most 200"),
    ("/v1/completions", {"max_tokens": 201}, "max_tokens", "max_tokens must be at most 200"),
])
def test_bad_constraints_are_400s_naming_the_field(server, path, body, param, message):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": USER}
    r = httpx.post(server.url + path, json={**base, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(message), err
    assert httpx.get(f"{server.url}/metrics").text.count("tokenmill:num_requests_waiting{") == 1


# ---- tool calls ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required(client, model, stream):
    content, calls, finish = _chat(client, model, stream, tools=TOOLS, tool_choice="required", temperature=1.0,
                                   seed=7, max_tokens=150, parallel_tool_calls=False)
    assert content is None and finish == "tool_calls" and len(calls) == 1
    call_id, name, arguments = calls[0]
    assert call_id.startswith("call_") and name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named(client, model, stream):
    content, calls, finish = _chat(client, model, stream, tools=TOOLS, temperature=0, max_tokens=150,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert content is None and finish == "stop" and [c[1] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0][2]), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_parses_hermes_calls(client, model, stream):
    """The random model never writes a call by itself: a regex makes it write text, then two calls
    in the Hermes format, which the auto parser must return as tool_calls."""
    forced = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}", '
              r'"unit": "celsius"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": '
              r'\{"tz": "UTC"\}\}\n</tool_call>')
    content, calls, finish = _chat(client, model, stream, tools=TOOLS, tool_choice="auto", temperature=0,
                                   max_tokens=150, extra_body={"structured_outputs": {"regex": forced}})
    assert content == "Checking.\n" and finish == "tool_calls"
    assert [c[1] for c in calls] == ["get_weather", "get_time"]
    for _, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_plain_text_when_no_call(client, model, tool_choice):
    r = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                       max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls and c.message.content
    assert r.usage.completion_tokens == 12


def test_tool_messages_in_history_are_rendered(server, client, model):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": history, "tools": TOOLS}).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n22 degrees\n</tool_response>" in text and '"name": "get_time"' in text
    out = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=5, temperature=0)
    assert out.usage.prompt_tokens == r["count"]


# ---- max_tokens caps ----------------------------------------------------------------------------

def test_default_max_tokens_and_limit(client, model):
    r = client.chat.completions.create(model=model, messages=USER, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=model, prompt="hi", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 48
    r = client.completions.create(model=model, prompt="hi", max_tokens=200, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 200
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=201)
    assert e.value.body["param"] == "max_tokens"


# ---- prompt logprobs -----------------------------------------------------------------------------

def test_echo_logprobs_and_prompt_logprobs_match_transformers(client, model, tool_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [101, 2045, 777, 31337, 9, 4242, 17]
    hf = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2,
                                  extra_body={"prompt_logprobs": 3})
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(prompt)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=2e-5)
        assert len(lp.top_logprobs[p]) >= 2
    assert c.text.startswith(httpx.post(f"{client.base_url}".removesuffix("/v1/") + "/detokenize",
                                        json={"tokens": prompt}).json()["prompt"])
    extra = c.model_extra["prompt_logprobs"]
    assert extra[0] is None and len(extra) == len(prompt)
    for p in range(1, len(prompt)):
        assert extra[p][str(prompt[p])]["logprob"] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=2e-5)
        top3 = ref[p - 1].topk(3).indices.tolist()
        assert {str(t) for t in top3} <= set(extra[p])
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                              logprobs=2, stream=True))
    tokens = [t for chunk in streamed for ch in chunk.choices if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for chunk in streamed for ch in chunk.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert tokens == lp.tokens and values == lp.token_logprobs


# ---- the server's contract ---------------------------------------------------------------------

def test_openapi_documents_what_the_server_does(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert all("422" not in op["responses"] for op in ops.values())
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = ops[path, "post"]
        assert {"200", "400", "404", "503"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(ops["/metrics", "get"]["responses"]["200"]["content"]) == {"text/plain"}
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 200} in props["max_tokens"]["anyOf"]  # --max-tokens-limit
    health = httpx.get(f"{server.url}/health")
    assert health.headers["content-type"] == "application/json" and health.json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")
    not_allowed = httpx.request("TRACE", f"{server.url}/health")
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET"
    assert not_allowed.json()["error"]["message"] == "Method Not Allowed"


def test_schemathesis_finds_nothing(server):
    """A short run of every schemathesis check (the long one is `make fuzz`): no 5xx, no response
    outside the schema, no undocumented status or content type."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
                          "--checks", "all", "--max-examples", "5", "--phases", "fuzzing", "--workers", "1",
                          "--seed", "13"], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-3000:]
