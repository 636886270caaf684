"""SamplingParams: how one request picks its tokens, with vLLM's names and meanings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from tokenmill.errors import ParamError

_GREEDY_EPS = 1e-5


class RequestOutputKind(Enum):
    """Which RequestOutputs a request yields from LLMEngine.step() (vLLM's names and values)."""
    CUMULATIVE = 0  # one every step it advances, with everything generated so far
    FINAL_ONLY = 2  # only the finished one (what LLM.generate reads)


@dataclass
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's names): exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object=True`), a regular expression,
    one of a list of strings (`choice`), or an EBNF grammar (xgrammar's dialect of GBNF)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ParamError("structured_outputs", "structured_outputs must give exactly one of json, regex, "
                                                   f"choice, grammar or json_object, got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ParamError("structured_outputs", "structured_outputs.json must be a JSON schema (an object "
                                                   f"or its JSON text), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ParamError("structured_outputs", f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ParamError("structured_outputs", "structured_outputs.choice must be a non-empty list of "
                                                   "non-empty strings")
        self.key  # noqa: B018  (JSON text that does not parse is an error now, not at compile time)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what identifies the compiled grammar (the grammar cache's key)."""
        if self.json is not None:
            schema: Any = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ParamError("structured_outputs", f"structured_outputs.json is not valid JSON: {e}") from None
            return "json", json.dumps(schema)  # key order kept: it is the order the output follows
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token (after the first): its logprob and the top n
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine, not the user: the model's EOS ids (ignored when ignore_eos).
    all_stop_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if self.temperature < _GREEDY_EPS:
            # Greedy ignores the truncation knobs; normalise them so the sampler's fast path applies.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0

    def _validate(self) -> None:
        def bad(name: str, msg: str) -> ParamError:
            return ParamError(name, f"{name} {msg}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise bad("top_k", "must be -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be positive")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "must be a non-negative integer or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "must be a non-negative integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams or None")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", f"must be one of {[k.name for k in RequestOutputKind]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_output_history(self) -> bool:
        """The sampler reads the tokens generated so far (penalties, min_tokens)."""
        return self.has_penalties or self.min_tokens > 0

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)
