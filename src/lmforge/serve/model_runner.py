"""Runs one scheduled step through the model: pack the batch, forward, return last-token logits.

On a GPU, pure decode steps (the hot loop) can go through `torch.compile` (dynamic shapes, so one
compilation serves every batch size); mixed prefill steps run eagerly. CPU always runs eagerly.
"""
from __future__ import annotations

import logging

import torch

from lmforge.serve.paged_cache import PagedKVCache, StepBatch
from lmforge.serve.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, compile_decode: bool = False):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self._decode_fn = None
        if compile_decode:
            try:
                self._decode_fn = torch.compile(model, dynamic=True)
            except Exception as e:  # a missing compiler toolchain must not stop serving
                log.warning("torch.compile unavailable, decoding eagerly: %s", e)

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[StepBatch, torch.Tensor]:
        """-> (the packed step, float32 logits [len(step.sampled), vocab])."""
        step = StepBatch(self.cache, items, self.device)
        forward = self.model
        if self._decode_fn is not None and not step.chunks:
            forward = self._decode_fn
        try:
            logits = forward(step.tokens, step.positions, cache=step, logits_index=step.logits_index)
        except Exception:
            if forward is self.model:
                raise
            log.exception("compiled decode failed; falling back to eager for good")
            self._decode_fn = None
            logits = self.model(step.tokens, step.positions, cache=step, logits_index=step.logits_index)
        return step, logits[0].float()

    @torch.inference_mode()
    def run_hidden(self, items: list[tuple[Sequence, int]]) -> tuple[StepBatch, torch.Tensor, torch.Tensor]:
        """As run, plus the final-norm hidden states [rows, dim] of the logit rows (Medusa heads
        read them); eager, with the LM head applied to just those rows."""
        step = StepBatch(self.cache, items, self.device)
        states = self.model(step.tokens, step.positions, cache=step, return_hidden=True)[0, step.logits_index]
        return step, self.model.lm_head(states).float(), states
