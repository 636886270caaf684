"""Request and response bodies of the OpenAI-compatible API (pydantic), with vLLM's extra fields.

Requests ignore fields they do not know (as vLLM does, so newer clients keep working); fields they
know but cannot honour (logit_bias, suffix, tools, ...) are rejected by the server with a 400,
never silently dropped. Value ranges are checked once, by SamplingParams.
"""
from __future__ import annotations

import time
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _wants_int(annotation) -> bool:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    return int in args and float not in args


def _list_items(annotation) -> list:
    """The item types of the list[...] members of an annotation."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    return [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list and typing.get_args(a)]


class _Request(BaseModel):
    # NOTE: strict: a value of the wrong JSON type is a 400 (lax pydantic would take "2" or 0 for a
    # number or a boolean, which the published schema says is invalid); an integral float such as
    # 2.0 is still an integer, as JSON Schema says.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integral_floats(cls, value, info):
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, float) and value.is_integer() and _wants_int(annotation):
            return int(value)
        if isinstance(value, list) and any(_wants_int(a) for a in _list_items(annotation)):
            return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
        return value


def _null_means_default(*names: str):
    """A validator: null for these fields means their default (clients send null for "unset")."""
    def validate(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value
    return field_validator(*names, mode="before")(classmethod(validate))


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(True, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Request):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's structured_outputs: exactly one constraint."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _SamplingRequest(_Request):
    """The fields completions and chat completions share."""
    model: str | None = None
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = Field(1.0, ge=0.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="one or more non-empty stop strings")
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: must be empty")
    # vLLM's extra sampling fields
    top_k: int | None = Field(-1, ge=-1, le=1 << 31, description="-1 or 0: no top-k cut")
    min_p: float | None = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(1.0, gt=0.0)
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0, description="at most max_tokens")
    priority: int | None = Field(0, ge=-(1 << 63), le=(1 << 63) - 1)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    kv_transfer_params: dict | None = None  # vLLM's prefill/decode disaggregation (NixlConnector protocol)

    _nulls = _null_means_default("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                                 "min_p", "repetition_penalty", "min_tokens", "priority", "skip_special_tokens",
                                 "ignore_eos", "stream")


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(description="a string, a list of strings, a list of token ids, or a list of those",
                        json_schema_extra={"anyOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                            {"type": "array", "minItems": 1, "items": {
                                "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]})
    # none given: --default-max-tokens, else 16 (as OpenAI and vLLM)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="vLLM's: logprobs of the prompt tokens, "
                                                                       "and this many top ones per token")
    best_of: int | None = Field(None, ge=1, le=128, description="must equal n")
    suffix: str | None = Field(None, max_length=0, description="not supported: must be empty")

    _echo_null = _null_means_default("echo")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value) -> list[str | list[int]]:
        """Normalised to a list of prompts, each a string or a list of token ids."""
        def is_ids(v) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or (is_ids(value) and value and not isinstance(value[0], list)):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
            return value
        if value == []:
            raise ValueError("prompt must not be empty")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) "
                         "or a list of token-id lists")


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, ...: passed to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="read only with logprobs: true")
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    # Not supported (the deprecated form of tools): rejected unless empty.
    functions: list | None = Field(None, max_length=0)
    # vLLM's extras
    add_generation_prompt: bool | None = True

    _chat_nulls = _null_means_default("logprobs", "add_generation_prompt", "parallel_tool_calls")


class TokenizeRequest(_Request):
    """Exactly one of prompt or messages."""
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    model: str | None = None
    prompt: str = Field(None, json_schema_extra={"type": "string"})  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(None, min_length=1, json_schema_extra={"type": "array"})  # type: ignore
    tools: list[ChatTool] | None = None  # rendered with messages, as a chat request would
    add_special_tokens: bool = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})


# ---- responses --------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache) or loaded (P/D)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)

    def extended(self, other: "CompletionLogProbs") -> "CompletionLogProbs":
        return CompletionLogProbs(text_offset=self.text_offset + other.text_offset,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  tokens=self.tokens + other.tokens, top_logprobs=self.top_logprobs + other.top_logprobs)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's: None for the first prompt token, then {token id: {"logprob", "decoded_token"}} per token
    prompt_logprobs: list[dict[str, dict[str, float | str]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    kv_transfer_params: dict | None = None  # a prefill instance's: where to pull the prompt's KV from


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    kv_transfer_params: dict | None = None  # a prefill instance's: where to pull the prompt's KV from


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
