"""Calibration text and the block-by-block pass that AWQ and GPTQ share.

Calibration text comes from the *train* split of the embedded corpus (Python's standard library,
split by a hash of each path: lmforge.corpus.stdlib); held-out perplexity is measured on the
*val* split (lmforge.serve.perplexity.heldout_text), so no evaluation text is ever calibrated on.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lmforge.corpus.stdlib import stdlib_documents
from lmforge.errors import LmforgeError
from lmforge.model.layers import rope_cos_sin

SPLIT = "train"


def calibration_text(max_chars: int = 400_000, stride: int = 7) -> str:
    """Every `stride`-th train-split file (varied modules, not one package), joined, cut at max_chars."""
    parts, size = [], 0
    for i, doc in enumerate(stdlib_documents(SPLIT)):
        if i % stride:
            continue
        parts.append(doc.text)
        size += len(doc.text) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def calibration_batch(tokenizer, n_samples: int = 16, seq_len: int = 256, text: str | None = None) -> torch.Tensor:
    """[n_samples, seq_len] token ids: consecutive windows of the tokenised calibration text."""
    ids = tokenizer.encode(text if text is not None else calibration_text())
    need = n_samples * seq_len
    if len(ids) < need:
        raise LmforgeError(f"calibration text has {len(ids)} tokens, {need} needed "
                           f"({n_samples} samples x {seq_len})")
    return torch.tensor(ids[:need]).view(n_samples, seq_len)


def capture_inputs(block: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Run `run()` (the block's forward) recording each nn.Linear's input as [tokens, in]."""
    inputs, hooks = {}, []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, inputs


@torch.no_grad()
def blockwise(model, tokens: torch.Tensor, quantize_block: Callable[[int, nn.Module, dict], None]) -> None:
    """For each decoder block in order: record its linear layers' inputs on the calibration tokens,
    let `quantize_block(i, block, inputs)` change its weights, then feed the next block the
    output of the changed block (so later blocks calibrate on what they will really see)."""
    if model.cfg.n_experts:
        raise LmforgeError("calibrated quantisation (awq, gptq) does not support mixture-of-experts models")
    device = model.embed_tokens.weight.device
    tokens = tokens.to(device)
    x = model.embed_tokens(tokens).float()
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    for i, block in enumerate(model.layers):
        _, inputs = capture_inputs(block, lambda: block(x, cos, sin, None, i, None))
        quantize_block(i, block, inputs)
        del inputs
        x = block(x, cos, sin, None, i, None)
