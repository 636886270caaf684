"""Request and response bodies of the OpenAI-compatible API (pydantic), with vLLM's extra fields.

Requests ignore fields they do not know (as vLLM does, so newer clients keep working); fields they
know but cannot honour (logit_bias, suffix, tools, ...) are rejected by the server with a 400,
never silently dropped. Value ranges are checked once, by SamplingParams.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


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
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # not supported: rejected unless empty
    # vLLM's extra sampling fields
    top_k: int = Field(-1, le=1 << 31)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = Field(0, ge=-(1 << 63), le=(1 << 63) - 1)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    _nulls = _null_means_default("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                                 "min_p", "repetition_penalty", "min_tokens", "priority", "skip_special_tokens",
                                 "ignore_eos", "stream")


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(description="a string, a list of strings, a list of token ids, or a list of those")
    max_tokens: int | None = None  # none given: --default-max-tokens, else 16 (as OpenAI and vLLM)
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="vLLM's: logprobs of the prompt tokens, "
                                                                       "and this many top ones per token")
    best_of: int | None = None
    suffix: str | None = None

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
    type: str
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, ...: passed to the chat template
    role: str
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
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Not supported (the deprecated form of tools): rejected unless empty.
    functions: list | None = None
    # vLLM's extras
    add_generation_prompt: bool = True

    _chat_nulls = _null_means_default("logprobs", "add_generation_prompt", "parallel_tool_calls")


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # rendered with messages, as a chat request would
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


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
