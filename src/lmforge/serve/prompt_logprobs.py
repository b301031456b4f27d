"""Log-probabilities of a prompt's own tokens (`echo=true` with `logprobs` on /v1/completions).

The engine computes logits only at each sequence's last position, so prompt scoring is one plain
forward pass over the prompt (no KV cache), run off the event loop and one at a time: the model's
weights are only read, so it can run beside the engine thread. The first token has no logprob
(nothing predicts it), as in OpenAI's API.
"""
from __future__ import annotations

import threading

import torch

from lmforge.serve.sequence import TokenLogprob

_ROWS = 256          # logits rows materialised at once: bounds memory for long prompts
_lock = threading.Lock()


@torch.inference_mode()
def prompt_logprobs(model, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """[None, lp(t1 | t0), lp(t2 | t0 t1), ...] with the k most likely alternatives at each position."""
    with _lock:
        device = next(model.parameters()).device
        tokens = torch.tensor([prompt_ids], device=device)
        hidden = model(tokens, return_hidden=True)[0]
        out: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt_ids) - 1, _ROWS):
            rows = hidden[start:min(start + _ROWS, len(prompt_ids) - 1)]
            lp = torch.log_softmax(model.logits(rows).float(), dim=-1)
            targets = prompt_ids[start + 1:start + 1 + len(rows)]
            chosen = lp[torch.arange(len(rows), device=device), torch.tensor(targets, device=device)].tolist()
            top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
            for r, (token, value) in enumerate(zip(targets, chosen)):
                top = list(zip(top_i[r].tolist(), top_v[r].tolist())) if k else []
                out.append(TokenLogprob(token, value, top))
        return out
