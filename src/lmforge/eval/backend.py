"""What every task asks of a model, whoever serves it: the backend interface and its requests.

Three primitives, as in lm-evaluation-harness's model API:
- `loglikelihood([(context, continuation)])` -> [(log p(continuation | context), is_greedy)]
- `loglikelihood_rolling([text])` -> [(log-likelihood of the whole text in nats, tokens scored)]
- `generate([GenerationRequest])` -> [completion text]
Backends: `LocalBackend` (an in-process lmforge model) and `EndpointBackend` (any
OpenAI-compatible `/v1/completions` server).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

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


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def load_backend(model: str | None = None, endpoint: str | None = None, tokenizer: str | None = None,
                 endpoint_model: str | None = None, dtype: str | None = None, device: str | None = None,
                 batch_tokens: int | None = None, api_key: str | None = None):
    if bool(model) == bool(endpoint):
        raise LmforgeError("give exactly one of --model (a checkpoint, HF directory or .gguf) or --endpoint (a URL)")
    if endpoint:
        from lmforge.eval.endpoint_backend import EndpointBackend
        return EndpointBackend(endpoint, model=endpoint_model, api_key=api_key)
    from lmforge.eval.local_backend import LocalBackend
    return LocalBackend.from_ref(model, tokenizer=tokenizer, dtype=dtype, device=device, batch_tokens=batch_tokens)
