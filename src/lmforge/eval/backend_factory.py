"""Choosing the backend an evaluation talks to: an in-process model or an OpenAI-compatible endpoint."""
from __future__ import annotations

from lmforge.errors import LmforgeError


def load_backend(model: str | None = None, endpoint: str | None = None, tokenizer: str | None = None,
                 endpoint_model: str | None = None, dtype: str | None = None, device: str | None = None,
                 batch_tokens: int | None = None, api_key: str | None = None):
    if bool(model) == bool(endpoint):
        raise LmforgeError("give exactly one of MODEL (a checkpoint, HF directory or .gguf) or --endpoint (a URL)")
    if endpoint:
        from lmforge.eval.endpoint_backend import EndpointBackend
        return EndpointBackend(endpoint, model=endpoint_model, api_key=api_key)
    from lmforge.eval.local_backend import LocalBackend
    return LocalBackend.from_ref(model, tokenizer=tokenizer, dtype=dtype, device=device, batch_tokens=batch_tokens)
