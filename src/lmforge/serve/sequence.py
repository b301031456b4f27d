"""A request inside the engine: its sampling parameters, its tokens, its place in the KV cache."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    seed: int | None = None             # per-request generator: same seed, same sample
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # None = off; k = chosen token's logprob + k alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: object | None = None       # a grammar.TokenGrammar: each sequence gets its own matcher

    def validate(self, vocab_size: int) -> None:
        problems = []
        numbers = [self.temperature, self.top_p, self.presence_penalty, self.frequency_penalty,
                   *(self.logit_bias or {}).values()]
        if not all(math.isfinite(x) for x in numbers):
            problems.append("sampling parameters must be finite numbers")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if not 0 <= self.temperature <= 100:
            problems.append(f"temperature must be in [0, 100] (got {self.temperature})")
        if not 0 <= self.top_p <= 1:
            problems.append(f"top_p must be in [0, 1] (got {self.top_p})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        if any(not -100 <= v <= 100 for v in (self.logit_bias or {}).values()):
            problems.append("logit_bias values must be in [-100, 100]")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in [0, 20] (got {self.logprobs})")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        bad_ids = [i for i in list(self.stop_token_ids) + list(self.logit_bias or {}) if not 0 <= i < vocab_size]
        if bad_ids:
            problems.append(f"token ids out of range [0, {vocab_size}): {bad_ids[:5]}")
        if problems:
            raise LmforgeError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or top_p 0 (the limit of a nucleus shrinking to the top token)."""
        return self.temperature == 0 or self.top_p == 0

    @property
    def greedy_only(self) -> bool:
        """Plain argmax: no sampling, penalties, biases or logprobs to compute."""
        return (self.greedy and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.logprobs is None and self.grammar is None)


class Status(enum.Enum):
    WAITING = "waiting"     # queued, or preempted and waiting to be recomputed
    RUNNING = "running"     # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]        # the k most likely alternatives (token id, logprob)


@dataclass
class RequestOutput:
    """What one engine step produced for one request (deltas, for streaming)."""
    request_id: str
    new_token_ids: list[int]
    text: str                           # new text, safe to show (never part of a stop string)
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None           # "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int                  # prompt tokens served from the prefix cache
    error: str | None = None            # why this request failed (finish_reason "error"); others go on


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None = None):
        if not prompt_ids:
            raise LmforgeError("the prompt is empty")
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.generator = generator
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed = 0           # tokens whose K/V are in the cache
        self.num_cached_prompt = 0      # prompt tokens that came from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []   # hashes of the full blocks registered so far
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        # --- speculative decoding (owned by serve/speculative): None = this request does not speculate
        self.spec = None                # a speculative.SpecState

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (the prompt, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
