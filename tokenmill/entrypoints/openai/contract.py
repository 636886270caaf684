"""The server's OpenAPI document, made to say what the server really does.

FastAPI's default document is wrong for this server in ways a client (or schemathesis) notices: it
promises a 422 the server never sends (validation errors are OpenAI-style 400s), leaves out the
400 / 401 / 404 / 503 it does send, knows nothing of event streams, calls /metrics JSON, and cannot
know the bounds that depend on the model and the flags (max_tokens, token ids, prompt lengths).
This module supplies the responses for the routes and patches those bounds in.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tokenmill.entrypoints.openai.protocol import ErrorResponse

_DESCRIPTIONS = {
    400: "Bad input: invalid JSON, a field out of range, or a rule the schema cannot say (the prompt plus "
         "max_tokens over the context, min_tokens over max_tokens, an invalid regex / JSON schema / grammar, "
         "a chat template refusing the messages); `param` names the field",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "The model named is not the one served",
    503: "The waiting queue is full, or the engine is not running",
}


class Health(BaseModel):
    status: str


def error_responses(with_auth: bool) -> dict[int, dict]:
    return {code: {"model": ErrorResponse, "description": text} for code, text in _DESCRIPTIONS.items()
            if code != 401 or with_auth}


def only(errors: dict[int, dict], *codes: int) -> dict[int, dict]:
    return {code: errors[code] for code in codes if code in errors}


def streaming(errors: dict[int, dict]) -> dict[int, dict]:
    """A generation route: JSON, or with "stream": true server-sent events."""
    # One schema per event (as schemathesis and OpenAPI 3.2's itemSchema read a stream).
    sse = {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "a chunk as JSON (an error object if the engine fails mid-stream), "
                                         "then the last event, `[DONE]`"}}}}
    return {200: {"description": "the completion (JSON), or its chunks as server-sent events when stream is true",
                  "content": {"text/event-stream": sse}}, **errors}


PLAIN_TEXT = {200: {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}


def install_openapi(app: FastAPI, server) -> None:
    """Serve the patched document at /openapi.json (built once)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _drop_422(doc)
            _patch_bounds(doc, server)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _drop_422(doc: dict) -> None:
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _patch_bounds(doc: dict, server) -> None:
    schemas = doc["components"]["schemas"]
    max_len, vocab = server.max_model_len, server.vocab_size
    limit = server.options.max_tokens_limit
    most = limit if limit is not None else max_len - 1
    # A prompt of token ids must leave room for one generated token (the prompt plus max_tokens
    # over the context is a 400 the schema cannot say); a text prompt's length in tokens is
    # known only once tokenized.
    prompt_tokens = max_len - 1
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    for name, fields in (("CompletionRequest", ("max_tokens",)),
                         ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens"))):
        props = schemas[name]["properties"]
        for field in fields:
            for option in props[field].get("anyOf", [props[field]]):
                if option.get("type") == "integer":
                    option["maximum"] = most
        for option in props["stop_token_ids"].get("anyOf", []):
            if option.get("type") == "array":
                option["items"] = dict(token)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for option in prompt["anyOf"]:
        items = option.get("items", {})
        if items.get("type") == "integer":
            option["items"], option["maxItems"] = dict(token), prompt_tokens
        elif items.get("type") == "array":
            items["items"], items["maxItems"] = dict(token), prompt_tokens
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = dict(token)
