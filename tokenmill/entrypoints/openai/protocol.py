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
    kv_transfer_params: dict | None = None  # vLLM's prefill/decode disaggregation (NixlConnector protocol)

    _nulls = _null_means_default("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                                 "min_p", "repetition_penalty", "min_tokens", "priority", "skip_special_tokens",
                                 "ignore_eos", "stream")


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(description="a string, a list of strings, a list of token ids, or a list of those")
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
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
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Not supported: rejected when set to anything but their no-op value.
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    response_format: dict | None = None
    # vLLM's extras
    add_generation_prompt: bool = True

    _chat_nulls = _null_means_default("logprobs", "add_generation_prompt")


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


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
