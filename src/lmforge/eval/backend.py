"""What every task asks of a model, whoever serves it: the backend interface and its requests.

Three primitives, as in lm-evaluation-harness's model API:
- `loglikelihood([(context, continuation)])` -> [(log p(continuation | context), is_greedy)]
- `loglikelihood_rolling([text])` -> [(log-likelihood of the whole text in nats, tokens scored)]
- `generate([GenerationRequest])` -> [completion text]
Implementations: `LocalBackend` (an in-process lmforge model) and `EndpointBackend` (any
OpenAI-compatible `/v1/completions` server); `backend_factory.load_backend` picks one.
This module only defines types, so tasks depend on the interface and never on a backend.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    chat: bool = False          # prompt is a user message; the backend applies its chat template


@dataclass
class BackendInfo:
    kind: str                   # "local" or "endpoint"
    model: str                  # path or endpoint model name
    details: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return f"{self.kind}:{self.model}:{self.details.get('fingerprint', '')}"


@runtime_checkable
class Backend(Protocol):
    """What a task may call. Log-likelihoods are natural logs (nats)."""

    info: BackendInfo
    max_length: int | None  # longest context in tokens; None when the backend cannot tell

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether the continuation is the greedy one) per pair."""
        ...

    def loglikelihood_rolling(self, texts: list[str], progress: Progress = None) -> list[tuple[float, int]]:
        """(log-likelihood of each whole text, number of tokens scored)."""
        ...

    def generate(self, requests: list[GenerationRequest], progress: Progress = None) -> list[str]:
        """One completion per request, cut at its stop strings."""
        ...
