"""OpenAI-compatible request bodies, validated strictly (a wrong type is a 400, never a coercion),
and their translation into engine SamplingParams. Unknown fields are accepted and ignored, as
OpenAI clients send fields that a given server may not use; null means "the default", as in
OpenAI's API.

Ranges follow OpenAI's API reference: temperature [0, 2], top_p [0, 1], penalties [-2, 2],
logit_bias values [-100, 100], at most 4 stop strings, top_logprobs [0, 20], completions logprobs
[0, 5]. top_p 0 is accepted (OpenAI accepts it and clients send it to ask for determinism) and
decodes greedily: a nucleus shrinking to zero mass keeps just the most likely token, so 0 is the
limit of the values just above it, not a special case. A temperature so small that logits/T
overflows likewise decodes greedily (its limit), in the sampler."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.serve.sequence import SamplingParams

MAX_N = 8
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
TOKEN_ID = re.compile(r"[0-9]{1,12}")  # ASCII digits only: int() also reads e.g. Arabic-Indic digits


class APIError(Exception):
    """An error answered as OpenAI error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallItem(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None        # an assistant's earlier calls
    tool_call_id: str | None = None                     # which call a `tool` message answers

    def for_template(self) -> dict:
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)                  # extension (vLLM style); -1 or 0 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False                                 # extension
    user: str | None = None
    response_format: dict | None = None                      # text | json_object | json_schema | regex (extension)

    @model_validator(mode="after")
    def _check_common(self):
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
        for key, value in (self.logit_bias or {}).items():
            if not TOKEN_ID.fullmatch(key) or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids (as strings of digits) to values in [-100, 100]")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        self.grammar_spec()  # a malformed response_format is a 400 here
        return self

    def grammar_spec(self) -> tuple[str, object] | None:
        """response_format as a grammar spec for lmforge.serve.grammar, or None for free text."""
        rf = self.response_format
        if rf is None:
            return None
        kind = rf.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return ("json_object", None)
        if kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            return ("json_schema", js.get("schema", {}))
        if kind == "regex":
            if not isinstance(rf.get("regex"), str):
                raise ValueError("response_format regex needs {'type': 'regex', 'regex': PATTERN}")
            return ("regex", rf["regex"])
        raise ValueError("response_format type must be one of text, json_object, json_schema, regex")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int, grammar=None) -> SamplingParams:
        seed = self.seed
        if seed is not None and self.n > 1:
            seed += choice  # n choices from one seed must still differ
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=max(0, self.top_k or 0), seed=seed,
            stop=self.stop_list(), ignore_eos=self.ignore_eos, logprobs=logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            grammar=grammar)


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if any(not TOOL_NAME.fullmatch(n) for n in names) or len(set(names)) != len(names):
            raise ValueError("tool names must be distinct and match [A-Za-z0-9_-]{1,64}")
        for t in self.tools or []:
            if (t.function.parameters or {}).get("type", "object") != "object":
                raise ValueError(f"tool {t.function.name!r}: parameters must be a JSON Schema of type object")
        choice = self.tool_choice_value()
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise ValueError(f"tool_choice names {choice['function']['name']!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice requires tools")
        if names and choice != "none" and self.grammar_spec() is not None:
            raise ValueError("response_format together with tools is only supported with tool_choice 'none'")
        return self

    def tool_choice_value(self):
        """'none' | 'auto' | 'required' | {'type': 'function', 'function': {'name': ...}} (validated)."""
        c = self.tool_choice
        if c is None:
            return "auto" if self.tools else "none"
        if isinstance(c, str):
            if c not in ("none", "auto", "required"):
                raise ValueError("tool_choice must be 'none', 'auto', 'required' or a named function")
            return c
        fn = c.get("function")
        if c.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': NAME}}")
        return c

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)   # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if isinstance(self.prompt, list) and (not self.prompt or any(isinstance(p, list) and not p for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (no server-side reranking)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo (to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)
