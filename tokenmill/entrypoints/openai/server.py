"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLMEngine.

Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad input
(naming the field), 401 for a bad key, 404 for an unknown model, 503 when the waiting queue is
full. Prompts are tokenized here (a private copy of the tokenizer: the engine thread decodes with
its own), so the server knows prompt lengths for usage, echo and the max_tokens check.

Streaming: the engine's outputs are cumulative; each choice keeps how much text and how many
tokens it has sent and emits the difference. While a stop string could still complete, the last
len(longest stop) - 1 characters are held back, because a completed stop string cuts the text
where it starts (as vLLM does).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError, RequestStream
from tokenmill.engine.metrics import PrometheusMetrics
from tokenmill.entrypoints.openai import contract
from tokenmill.entrypoints.openai.protocol import (
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatLogProb,
    ChatLogProbs, ChatLogProbsContent, ChatMessage, ChatResponseMessage, ChatStreamChoice, CompletionChoice,
    CompletionLogProbs, CompletionRequest, CompletionResponse, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
    DetokenizeRequest, DetokenizeResponse, ErrorInfo, ErrorResponse, FunctionCall, ModelCard, ModelList,
    PromptTokensDetails, TokenizeRequest, TokenizeResponse, ToolCall, UsageInfo)
from tokenmill.entrypoints.openai.tool_parsers import (
    PARSERS, TOOL_CALL_PARSERS, ParsedCall, ParsedOutput, ToolCallStream, required_schema)
from tokenmill.errors import ParamError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("tokenmill.server")

_MAX_N = 128
_MAX_LOGPROBS = 20
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "server_error"),
                                         param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _client_param(e: ValueError, rename: dict[str, str]) -> str | None:
    """The request field a ValueError from SamplingParams / LLMEngine is about (a ParamError carries
    it), as the client named it."""
    param = getattr(e, "param", None)
    return rename.get(param, param)


def _renamed(message: str, param: str) -> str:
    """A structured-outputs error message, led by the field the client used."""
    if message.startswith("structured_outputs"):  # "structured_outputs.json is ...", "... must give"
        return param + message.removeprefix("structured_outputs") if param == "structured_outputs" else \
            f"{param}: {message}"
    return f"{param}: {message}"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_finish_reason(mode: _ToolMode, finish_reason: str | None) -> str | None:
    """ "tool_calls" when the model stopped having called tools (a named function: "stop", as OpenAI)."""
    return "tool_calls" if finish_reason == "stop" and mode.kind != "named" else finish_reason


def _hold_back(stop: str | list[str] | None) -> int:
    """Characters a stream holds back while a stop string could still complete and cut them."""
    stops = [stop] if isinstance(stop, str) else stop or []
    return max((len(s) for s in stops), default=1) - 1


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class _ChoiceState:
    """What one streamed choice has sent so far."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # echo: the prompt text, sent with the first delta
        self.num_chars = 0
        self.num_tokens = 0
        self.done = False

    def advance(self, c: CompletionOutput, hold_back: int) -> tuple[str, list[int]] | None:
        """The new text and token ids of c since the last call; None if nothing is to be sent."""
        if self.done:
            return None
        end = len(c.text) if c.finish_reason is not None else max(self.num_chars, len(c.text) - hold_back)
        text, self.num_chars = c.text[self.num_chars:end], end
        tokens, self.num_tokens = c.token_ids[self.num_tokens:], len(c.token_ids)
        if self.prefix:
            text, self.prefix = self.prefix + text, ""
        self.done = c.finish_reason is not None
        if not text and not tokens and not self.done:
            return None
        return text, tokens


@dataclass(frozen=True)
class ServerOptions:
    """What `tokenmill serve` adds to the engine: the API key, tool-call parsing and max_tokens caps."""
    api_key: str | None = None
    tool_call_parser: str | None = None  # how tool_choice "auto" reads calls (TOOL_CALL_PARSERS)
    default_max_tokens: int | None = None  # a request that gives no max_tokens gets this
    max_tokens_limit: int | None = None  # a request asking for more gets a 400

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        for name in ("default_max_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.default_max_tokens and self.max_tokens_limit and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")


@dataclass
class _ToolMode:
    """How a chat request's output is read: plain text, or tool calls (auto / required / named)."""
    kind: str  # "text" | "auto" | "required" | "named"
    name: str | None = None  # the named function

    def parser(self, parser_name: str | None):
        if self.kind == "named":
            name = self.name
            return lambda text, final: ParsedOutput("", [ParsedCall(name, text, final)])
        return PARSERS["required" if self.kind == "required" else parser_name]


class OpenAIServer:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: PrometheusMetrics | None = None,
                 options: ServerOptions = ServerOptions()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.options = options
        self.api_key = options.api_key
        # NOTE: a private copy: Rust tokenizers must not be used from two threads at once.
        self.tokenizer = copy.deepcopy(engine.get_tokenizer())
        self.max_model_len = engine.config.max_model_len
        self.vocab_size = engine.vocab_size
        self._token_text: dict[int, str] = {}

    # ---- shared helpers -----------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                           param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: list[dict] | None = None) -> list[int]:
        rendered = []
        for i, m in enumerate(messages):
            msg = m.model_dump(exclude_none=True)
            msg.setdefault("content", "")  # templates read it even where it may be null (tool calls)
            for call in msg.get("tool_calls", []):
                # Templates read an earlier call's arguments as a mapping; clients send JSON text.
                fn = call.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        raise APIError(400, "an earlier tool call's arguments are not valid JSON",
                                       param=f"messages.{i}.tool_calls") from None
            if isinstance(m.content, list):
                parts = []
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                                       param=f"messages.{i}.content.{j}.type")
                    parts.append(part.text)
                msg["content"] = "\n".join(parts)
            rendered.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(rendered, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja TemplateError (e.g. raise_exception in the template), ValueError
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        # The template holds the special tokens (BOS etc.): don't add them twice.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def resolve_max_tokens(self, given: int | None, omitted_default: int | None, param: str) -> int | None:
        """max_tokens as the engine gets it: the request's own (at most --max-tokens-limit, else a 400),
        or when it gives none --default-max-tokens, else `omitted_default` (None: up to the context),
        capped by the limit."""
        limit = self.options.max_tokens_limit
        if given is not None:
            if limit is not None and given > limit:
                raise APIError(400, f"{param} must be at most {limit} on this server, got {given}", param=param)
            return given
        value = self.options.default_max_tokens or omitted_default
        if limit is not None:
            value = limit if value is None else min(value, limit)
        return value

    def check_prompt(self, ids: list[int], max_tokens: int | None, prompt_param: str, max_tokens_param: str) -> None:
        if not ids:
            raise APIError(400, "prompt must not be empty", param=prompt_param)
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                                f"prompt is {len(ids)} tokens long (the prompt plus at least one generated "
                                f"token must fit)", param=prompt_param)
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion). Reduce the prompt or {max_tokens_param}.",
                           param=max_tokens_param)

    def structured_spec(self, body) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's constraint (response_format or structured_outputs) and the field it came in."""
        fmt, so = body.response_format, body.structured_outputs
        if so is not None and fmt is not None and fmt.type != "text":
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        param = "structured_outputs" if so is not None else "response_format"
        try:
            if so is not None:
                return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                               json_object=so.json_object), param
            if fmt is None or fmt.type == "text":
                return None, None
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True), param
            if fmt.json_schema is None:
                raise APIError(400, "response_format.json_schema is required with type json_schema",
                               param="response_format.json_schema")
            schema = fmt.json_schema.json_schema
            if schema is True or schema == {}:  # any JSON value: any JSON object is what clients mean
                return StructuredOutputsParams(json_object=True), param
            return StructuredOutputsParams(json=schema), param
        except ParamError as e:
            raise APIError(400, _renamed(str(e), param), param=param) from None

    async def compile_constraint(self, spec: StructuredOutputsParams | None, param: str | None) -> None:
        """Compile (or find cached) the constraint's grammar before anything is queued: a bad spec, or
        one that takes longer than --grammar-compile-timeout, is a 400 naming the field."""
        if spec is None:
            return
        timeout = self.engine.config.grammar_compile_timeout
        cache = await asyncio.to_thread(lambda: self.engine.engine.grammar_cache)
        future = asyncio.wrap_future(cache.compile(spec))
        try:
            # NOTE: shielded: the compile is shared by every request with this spec, and cached.
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"{param}: compiling the {spec.key[0]} constraint took longer than {timeout:g} s",
                           param=param) from None
        except ParamError as e:
            raise APIError(400, _renamed(str(e), param), param=param) from None

    def sampling_params(self, body, *, max_tokens: int | None, logprobs: int | None,
                        names: dict[str, str], structured_outputs: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        if body.n > _MAX_N:
            raise APIError(400, f"n must be at most {_MAX_N}, got {body.n}", param="n")
        if logprobs is not None and logprobs > _MAX_LOGPROBS:
            raise APIError(400, f"{names.get('logprobs', 'logprobs')} must be at most {_MAX_LOGPROBS}, "
                                f"got {logprobs}", param=names.get("logprobs", "logprobs"))
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        try:
            return SamplingParams(
                n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k or -1, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, seed=body.seed, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
                structured_outputs=structured_outputs)
        except ValueError as e:
            param, message = _client_param(e, names), str(e)
            if param is not None and param != e.param:  # the message names the field the client sent
                message = param + message.removeprefix(e.param)
            raise APIError(400, message, param=param) from None

    async def add_requests(self, request_id: str, prompts: list[_Prompt], params: SamplingParams, body,
                           arrival_time: float, prompt_param: str) -> list[RequestStream]:
        """Queue one engine request per prompt; all or nothing."""
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(
                    rid, {"prompt": p.text, "prompt_token_ids": p.token_ids}, params, priority=body.priority,
                    tenant=body.user or "default", arrival_time=arrival_time,
                    kv_transfer_params=body.kv_transfer_params if len(prompts) == 1 else None))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, ValueError):
                names = {"prompt": prompt_param, "prompt_token_ids": prompt_param}
                raise APIError(400, str(e), param=_client_param(e, names)) from None
            if isinstance(e, QueueFullError):
                raise APIError(503, str(e), code="queue_full") from None
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), code="engine_dead") from None
            raise
        return streams

    def usage(self, prompts: list[_Prompt], finals: list[RequestOutput]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        cached_tokens = sum(out.num_cached_tokens or 0 for out in finals if out is not None)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))

    # ---- /v1/completions ------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, raw: Request) -> Response:
        arrival_time = time.time()
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of must equal n (only n samples are generated), got best_of="
                                f"{body.best_of}, n={body.n}", param="best_of")
        max_tokens = self.resolve_max_tokens(body.max_tokens, 16, "max_tokens")
        prompts = []
        for p in body.prompt:
            prompt = _Prompt(p, self.tokenizer.encode(p) if p else []) if isinstance(p, str) else _Prompt(None, p)
            self.check_prompt(prompt.token_ids, body.max_tokens, "prompt", "max_tokens")
            prompts.append(prompt)
        if body.max_tokens is None and max_tokens is not None:
            # A server default that would not fit a prompt's context shrinks to what does.
            max_tokens = min([max_tokens] + [self.max_model_len - len(p.token_ids) for p in prompts])
        spec, spec_param = self.structured_spec(body)
        params = self.sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, names={},
                                      structured_outputs=spec)
        want_prompt = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
        if want_prompt:
            params = params.clone(prompt_logprobs=max(want_prompt))
        await self.compile_constraint(spec, spec_param)
        request_id = _request_id(raw, "cmpl")
        streams = await self.add_requests(request_id, prompts, params, body, arrival_time, "prompt")
        echo_texts = [self._prompt_text(p) if body.echo else "" for p in prompts]
        if body.stream:
            return _EventStream(self._completion_stream(request_id, body, prompts, streams, echo_texts), streams)
        finals = await _collect(streams, raw)
        if finals is None:
            return Response(status_code=499)  # the client left; its requests were aborted
        _raise_failed(finals)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs(c.token_ids, c.logprobs, len(echo_texts[i]))
                    if body.echo:
                        logprobs = self._echo_logprobs(out, body.logprobs).extended(logprobs)
                choices.append(CompletionChoice(
                    index=i * body.n + c.index, text=echo_texts[i] + c.text, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, logprobs=logprobs,
                    prompt_logprobs=self._prompt_logprobs(out) if body.prompt_logprobs is not None else None))
        return JSONResponse(CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                               usage=self.usage(prompts, finals),
                                               kv_transfer_params=finals[0].kv_transfer_params).model_dump())

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.token_ids)

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, dict[str, float | str]] | None]:
        return [None if lp is None else {str(t): {"logprob": v, "decoded_token": self.token_text(t)}
                                         for t, v in lp.items()} for lp in out.prompt_logprobs]

    def _echo_logprobs(self, out: RequestOutput, top_n: int) -> CompletionLogProbs:
        """echo with logprobs: the prompt's tokens first (the first has no logprob, as OpenAI's)."""
        result, offset = CompletionLogProbs(), 0
        for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs):
            text = self.token_text(tok)
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
            if lp is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(lp[tok])
            # As for generated tokens: the token's own logprob and the top_n most likely.
            top = sorted(lp.items(), key=lambda kv: -kv[1])
            own = [kv for kv in top if kv[0] == tok]
            result.top_logprobs.append({self.token_text(t): v for t, v in top[:top_n] + own})
        return result

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                             offset: int) -> CompletionLogProbs:
        out = CompletionLogProbs()
        for tok, lp in zip(token_ids, logprobs or []):
            text = self.token_text(tok)
            out.tokens.append(text)
            out.token_logprobs.append(lp.get(tok))
            out.top_logprobs.append({self.token_text(t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    async def _completion_stream(self, request_id: str, body: CompletionRequest, prompts: list[_Prompt],
                                 streams: list[RequestStream], echo_texts: list[str]) -> AsyncIterator[str]:
        created = int(time.time())
        hold_back = _hold_back(body.stop)
        states = [[_ChoiceState(echo_texts[i]) for _ in range(body.n)] for i in range(len(prompts))]
        offsets = [[0] * body.n for _ in prompts]
        echoed: set[tuple[int, int]] = set()
        finals: list[RequestOutput | None] = [None] * len(prompts)
        usage_opts = body.stream_options
        try:
            async for i, out in _merge(streams):
                if out.error is not None:
                    yield f"data: {json.dumps(error_body(500, out.error, code='kv_transfer_failed'))}\n\n"
                    return
                finals[i] = out
                choices = []
                for c in out.outputs:
                    delta = states[i][c.index].advance(c, hold_back)
                    if delta is None:
                        continue
                    text, tokens = delta
                    logprobs = None
                    if body.logprobs is not None:
                        if body.echo and (i, c.index) not in echoed:
                            echoed.add((i, c.index))
                            echo = self._echo_logprobs(out, body.logprobs)
                            offsets[i][c.index] = len(echo_texts[i])
                        else:
                            echo = None
                        logprobs = self._completion_logprobs(tokens, c.logprobs[len(c.logprobs) - len(tokens):],
                                                             offsets[i][c.index])
                        offsets[i][c.index] += sum(len(t) for t in logprobs.tokens)
                        if echo is not None:
                            logprobs = echo.extended(logprobs)
                    choice = CompletionChoice(index=i * body.n + c.index, text=text, logprobs=logprobs,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                    if body.prompt_logprobs is not None and c.finish_reason is not None:
                        choice.prompt_logprobs = self._prompt_logprobs(out)
                    choices.append(choice)
                if choices:
                    chunk = CompletionResponse(id=request_id, created=created, model=self.model_name,
                                               choices=choices)
                    if usage_opts and usage_opts.include_usage and usage_opts.continuous_usage_stats:
                        chunk.usage = self.usage(prompts, finals)
                    yield f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
            if usage_opts and usage_opts.include_usage:
                chunk = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                           usage=self.usage(prompts, finals))
                yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            for s in streams:
                s.abort()

    # ---- /v1/chat/completions -------------------------------------------------------------------

    async def create_chat_completion(self, body: ChatCompletionRequest, raw: Request) -> Response:
        arrival_time = time.time()
        self.check_model(body.model)
        if body.functions:
            raise APIError(400, "functions is not supported: use tools", param="functions")
        mode = self.tool_mode(body)
        if body.max_completion_tokens is not None and body.max_tokens is not None:
            self.resolve_max_tokens(body.max_tokens, None, "max_tokens")  # both are bounded by the limit
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.resolve_max_tokens(given, None, max_tokens_param)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = self.render_chat(body.messages, body.add_generation_prompt, tools)
        prompt = _Prompt(None, ids)
        self.check_prompt(ids, given, "messages", max_tokens_param)
        if given is None and max_tokens is not None:
            max_tokens = min(max_tokens, self.max_model_len - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        names = {"max_tokens": max_tokens_param, "logprobs": "top_logprobs"}
        spec, spec_param = self.structured_spec(body)
        if mode.kind in ("required", "named"):
            if spec is not None:
                raise APIError(400, f"tool_choice {mode.kind!r} constrains the output itself: drop {spec_param}",
                               param=spec_param)
            functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
            schema = required_schema(functions, body.parallel_tool_calls) if mode.kind == "required" else \
                next(f.get("parameters") or {"type": "object"} for f in functions if f["name"] == mode.name)
            spec, spec_param = self.structured_spec_of(schema, "tools")
        params = self.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, names=names,
                                      structured_outputs=spec)
        if mode.kind == "auto" and self.options.tool_call_parser in ("llama3_json", "mistral"):
            params = params.clone(skip_special_tokens=False)  # their markers are special tokens
        await self.compile_constraint(spec, spec_param)
        request_id = _request_id(raw, "chatcmpl")
        streams = await self.add_requests(request_id, [prompt], params, body, arrival_time, "messages")
        top_n = body.top_logprobs or 0
        if body.stream:
            return _EventStream(self._chat_stream(request_id, body, prompt, streams[0], top_n, mode), streams)
        finals = await _collect(streams, raw)
        if finals is None:
            return Response(status_code=499)
        _raise_failed(finals)
        out = finals[0]
        choices = []
        for c in out.outputs:
            message, finish_reason = ChatResponseMessage(content=c.text), c.finish_reason
            if mode.kind != "text":
                parsed = mode.parser(self.options.tool_call_parser)(c.text, True)
                calls = [ToolCall(id=_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
                         for call in parsed.calls if call.name is not None and call.complete]
                if calls:
                    message = ChatResponseMessage(content=parsed.content or None, tool_calls=calls)
                    finish_reason = _tool_finish_reason(mode, c.finish_reason)
            choices.append(ChatChoice(
                index=c.index, message=message, finish_reason=finish_reason, stop_reason=c.stop_reason,
                logprobs=self._chat_logprobs(c.token_ids, c.logprobs, top_n) if body.logprobs else None))
        return JSONResponse(ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                                   usage=self.usage([prompt], finals),
                                                   kv_transfer_params=out.kv_transfer_params).model_dump())

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                       top_n: int) -> ChatLogProbs:
        content = []
        for tok, lp in zip(token_ids, logprobs or []):
            text = self.token_text(tok)
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(ChatLogProbsContent(
                token=text, logprob=lp[tok], bytes=list(text.encode()),
                top_logprobs=[ChatLogProb(token=self.token_text(t), logprob=v, bytes=list(self.token_text(t).encode()))
                              for t, v in top]))
        return ChatLogProbs(content=content)

    def tool_mode(self, body: ChatCompletionRequest) -> _ToolMode:
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools", param="tool_choice")
            return _ToolMode("text")
        if choice == "none":
            return _ToolMode("text")
        if choice is None or choice == "auto":
            if self.options.tool_call_parser is None:
                if choice is None:
                    return _ToolMode("text")  # tools shown to the model, its text returned as it is
                raise APIError(400, 'tool_choice "auto" needs a server started with --tool-call-parser',
                               param="tool_choice")
            return _ToolMode("auto")
        if choice == "required":
            return _ToolMode("required")
        names = [t.function.name for t in body.tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among "
                                f"the tools ({', '.join(names)})", param="tool_choice.function.name")
        return _ToolMode("named", choice.function.name)

    def structured_spec_of(self, schema: dict, param: str) -> tuple[StructuredOutputsParams, str]:
        try:
            return StructuredOutputsParams(json=schema), param
        except ParamError as e:
            raise APIError(400, _renamed(str(e), param), param=param) from None

    async def _chat_stream(self, request_id: str, body: ChatCompletionRequest, prompt: _Prompt,
                           stream: RequestStream, top_n: int, mode: _ToolMode) -> AsyncIterator[str]:
        created = int(time.time())
        hold_back = _hold_back(body.stop)
        states = [_ChoiceState() for _ in range(body.n)]
        tool_streams = [ToolCallStream(mode.parser(self.options.tool_call_parser)) if mode.kind != "text" else None
                        for _ in range(body.n)]
        call_ids: dict[tuple[int, int], str] = {}
        usage_opts = body.stream_options
        final: RequestOutput | None = None

        def chunk(choices, usage: UsageInfo | None = None) -> str:
            resp = ChatCompletionStreamResponse(id=request_id, object="chat.completion.chunk", created=created,
                                                model=self.model_name, choices=choices,
                                                **({"usage": usage} if usage else {}))
            return f"data: {resp.model_dump_json(exclude_unset=True)}\n\n"

        try:
            # The first delta of each choice carries the role (as OpenAI's and vLLM's).
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""),
                                          finish_reason=None) for i in range(body.n)])
            async for out in stream:
                if out.error is not None:
                    yield f"data: {json.dumps(error_body(500, out.error, code='kv_transfer_failed'))}\n\n"
                    return
                final = out
                choices = []
                for c in out.outputs:
                    delta = states[c.index].advance(c, hold_back)
                    if delta is None:
                        continue
                    text, tokens = delta
                    message, finish_reason = DeltaMessage(content=text), c.finish_reason
                    tools = tool_streams[c.index]
                    if tools is not None:
                        content, calls = tools.advance(c.text[:states[c.index].num_chars], c.finish_reason is not None)
                        message = DeltaMessage(content=content) if content or not calls else DeltaMessage()
                        if calls:
                            message.tool_calls = [self._delta_call(c.index, i, name, piece, call_ids)
                                                  for i, name, piece in calls]
                        if call_ids and c.finish_reason is not None:
                            finish_reason = _tool_finish_reason(mode, c.finish_reason)
                    choice = ChatStreamChoice(index=c.index, delta=message, finish_reason=finish_reason)
                    if c.finish_reason is not None:
                        choice.stop_reason = c.stop_reason
                    if body.logprobs:
                        choice.logprobs = self._chat_logprobs(tokens, c.logprobs[len(c.logprobs) - len(tokens):],
                                                              top_n)
                    choices.append(choice)
                if choices:
                    usage = None
                    if usage_opts and usage_opts.include_usage and usage_opts.continuous_usage_stats:
                        usage = self.usage([prompt], [final])
                    yield chunk(choices, usage)
            if usage_opts and usage_opts.include_usage:
                yield chunk([], self.usage([prompt], [final]))
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            stream.abort()

    @staticmethod
    def _delta_call(choice: int, index: int, name: str | None, piece: str,
                    call_ids: dict[tuple[int, int], str]) -> DeltaToolCall:
        """A tool-call delta: the first of a call carries its id, type and name, the rest arguments."""
        if name is not None:
            call_ids[choice, index] = _call_id()
            return DeltaToolCall(index=index, id=call_ids[choice, index], type="function",
                                 function=DeltaFunctionCall(name=name, arguments=piece))
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=piece))

    # ---- tokenizer endpoints --------------------------------------------------------------------

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            ids = self.render_chat(body.messages, body.add_generation_prompt, tools)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"tokens contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})",
                           param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))


# ---- streams ----------------------------------------------------------------------------------------

def _raise_failed(finals: list[RequestOutput]) -> None:
    """A request the engine failed (a KV pull under --kv-load-failure-policy fail) answers 500."""
    failed = next((out for out in finals if out.error is not None), None)
    if failed is not None:
        raise APIError(500, failed.error, code="kv_transfer_failed")


def _request_id(raw: Request, prefix: str) -> str:
    """The id of a request (and of its response): the client's X-Request-Id (a router's, so one request
    has one id on every instance it passes through) under the OpenAI prefix, as vLLM names it."""
    given = raw.headers.get("x-request-id")
    return f"{prefix}-{given}" if given else f"{prefix}-{uuid.uuid4().hex}"


class _EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends (done, disconnect,
    cancelled before the body generator ever ran)."""

    def __init__(self, gen: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.abort()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _collect(streams: list[RequestStream], raw: Request) -> list[RequestOutput] | None:
    """The final output of each stream; None (with every stream aborted) if the client disconnects."""
    async def last(stream: RequestStream) -> RequestOutput:
        out = None
        async for out in stream:
            pass
        return out

    try:
        return await _unless_disconnected(asyncio.gather(*(last(s) for s in streams)), raw)
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_dead") from None
    finally:
        for s in streams:
            s.abort()


async def _unless_disconnected(aw: Awaitable, raw: Request):
    """The result of aw, or None (aw cancelled) if the client disconnects first."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    return None


# ---- the app ---------------------------------------------------------------------------------------

def build_app(engine: AsyncLLMEngine, model_name: str, metrics: PrometheusMetrics | None = None,
              options: ServerOptions = ServerOptions()) -> FastAPI:
    server = OpenAIServer(engine, model_name, metrics, options)
    api_key = options.api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.server = server

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        # The most specific error: of a union's members, the one that got furthest into the value.
        err = max(e.errors(), key=lambda er: len(er.get("loc", ()))) if e.errors() else \
            {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in err.get("loc", ())[1:] if not _is_union_tag(p)]
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", err["msg"])
            return error_response(400, f"The request body is not valid JSON: {reason}")
        if err.get("type") == "missing" and not loc:
            return error_response(400, "The request needs a JSON object body")
        param = ".".join(loc) or None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param and not msg.startswith(param) else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        response = error_response(e.status_code, str(e.detail))
        response.headers.update(e.headers or {})  # 405: Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    auth = [Depends(check_api_key)]
    errors = contract.error_responses(api_key is not None)

    @app.get("/health", response_model=contract.Health, responses=contract.only(errors, 503))
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, f"the engine is not running ({engine.error or 'stopped'})")
        return JSONResponse({"status": "ok"})

    @app.middleware("http")
    async def echo_request_id(request: Request, call_next):
        response = await call_next(request)
        given = request.headers.get("x-request-id")
        if given is not None:
            response.headers["X-Request-Id"] = given
        return response

    def load() -> int:
        s = engine.stats().scheduler
        return s.num_running + s.num_waiting + s.num_swapped

    @app.get("/get_load")
    async def get_load() -> dict:
        """SGLang's load report (vllm-router's power_of_two polls it): requests running or waiting."""
        return {"load": load()}

    @app.get("/load")
    async def vllm_load() -> dict:
        """vLLM's load report."""
        return {"server_load": load()}

    @app.get("/get_server_info", dependencies=auth)
    async def get_server_info() -> dict:
        """The resolved engine configuration and the KV cache's size (what a router or operator asks)."""
        stats = engine.stats()
        return {**dataclasses.asdict(engine.config), "served_model_name": model_name,
                "model_path": str(engine.config.model or model_name),
                "num_kv_blocks": stats.scheduler.num_total_blocks}

    @app.get("/get_model_info", dependencies=auth)
    async def get_model_info() -> dict:
        return {"model_path": str(engine.config.model or model_name), "served_model_name": model_name,
                "is_generation": True, "max_model_len": server.max_model_len}

    @app.get("/metrics", response_class=PlainTextResponse, responses=contract.PLAIN_TEXT)
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render() if metrics else b"", media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, responses=contract.only(errors, 401))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, root=str(engine.config.model or model_name),
                                         max_model_len=server.max_model_len)])

    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse,
              responses=contract.streaming(errors))
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await server.create_completion(body, raw)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletionResponse,
              responses=contract.streaming(errors))
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await server.create_chat_completion(body, raw)

    @app.post("/tokenize", dependencies=auth, responses=contract.only(errors, 400, 401, 404))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return server.tokenize(body)

    @app.post("/detokenize", dependencies=auth, responses=contract.only(errors, 400, 401, 404))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return server.detokenize(body)

    contract.install_openapi(app, server)
    return app


def _is_union_tag(part) -> bool:
    """pydantic's loc entries naming a union member ('list[int]', 'function-after[...]'), not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def run_server(engine_kwargs: dict, host: str = "127.0.0.1", port: int = 8000,
               options: ServerOptions = ServerOptions(), served_model_name: str | None = None,
               log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = AsyncLLMEngine.from_engine_args(**engine_kwargs)
    model_name = served_model_name or engine_kwargs.get("model") or "SmolLM2-135M-Instruct"
    metrics = PrometheusMetrics(model_name, engine.stats)
    engine.listener = metrics
    app = build_app(engine, model_name, metrics, options)
    logger.info("serving %s on http://%s:%d (max_model_len %d, %d KV blocks)", model_name, host, port,
                engine.config.max_model_len, engine.stats().scheduler.num_total_blocks)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
