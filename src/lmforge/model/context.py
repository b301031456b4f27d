"""The one prompt-fitting rule used by every generator (engine, eval, reference sampler, CLI).

A request of `max_tokens` new tokens after a prompt must fit `context_len` positions: first
max_tokens is clamped so that at least one prompt token fits, then the prompt keeps its tail
(the most recent text is what the continuation depends on).
"""
from __future__ import annotations

from lmforge.errors import LmforgeError


def fit_to_context(prompt_ids: list[int], max_tokens: int, context_len: int) -> tuple[list[int], int]:
    """-> (prompt ids that fit, max_tokens that fit); never an empty prompt."""
    if context_len < 2:
        raise LmforgeError(f"a context of {context_len} token(s) leaves no room to generate")
    if not prompt_ids:
        raise LmforgeError("the prompt encodes to no tokens")
    max_tokens = max(1, min(max_tokens, context_len - 1))
    return list(prompt_ids[-(context_len - max_tokens):]), max_tokens
