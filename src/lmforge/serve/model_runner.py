"""Runs one scheduled step through the model: pack the batch, forward, return last-token logits.

With compile_decode, decode steps (every sequence adds at most ROW_TOKENS tokens: decoding and
speculative verification, the hot loop) run through `torch.compile` over a tensor-only view of the
step (`DecodeView`), with dynamic shapes, so one graph serves every length and every batch size
above one; steps that carry longer prompt chunks run eagerly. On CPU the graph is built with Inductor's C++ wrapper and
autotuned kernels (the wrapper removes the per-kernel Python call; autotuning picks the int4
matmul); compiling SmolLM2-135M takes a minute or two per graph on 2 cores, once per engine
(Inductor caches compiled code on disk, so later processes start faster).
"""
from __future__ import annotations

import logging
import types

import torch

from lmforge.serve.paged_cache import PagedKVCache, StepBatch
from lmforge.serve.sequence import Sequence

log = logging.getLogger(__name__)

# Inductor options per device type. CPU, SmolLM2-135M int4, one thread: eager 19.0 ms/step,
# default options 14.8, cpp_wrapper 13.0, cpp_wrapper + max_autotune 11.5.
COMPILE_OPTIONS = {"cpu": {"cpp_wrapper": True, "max_autotune": True}}


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, compile_decode: bool = False):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.compile_decode = compile_decode
        self._decode_fn = None

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[StepBatch, torch.Tensor]:
        """-> (the packed step, float32 logits [len(step.sampled), vocab])."""
        step = StepBatch(self.cache, items, self.device)
        if self._decode_fn is not None and step.is_decode:
            try:
                logits = self._decode_fn(self.model, step.tokens, step.positions, step.decode_view(), step.logits_index)
                return step, logits[0].float()
            except Exception:  # e.g. no C++ toolchain: serving goes on eagerly (re-running the step is safe:
                log.exception("compiled decode failed; decoding eagerly from now on")  # writes are idempotent)
                self._decode_fn, self.compile_decode = None, False
        logits = self.model(step.tokens, step.positions, cache=step, logits_index=step.logits_index)
        if self.compile_decode and self._decode_fn is None and step.is_decode:
            # Compiled only after one eager decode step, which has built every lazily made kernel
            # layout (int4 packing), so the graph never traces their construction. The cache's
            # tensors are marked static: with dynamic=True their sizes would be symbols, and duck
            # sizing would tie e.g. the KV head count to a batch that happens to equal it.
            from torch._dynamo import mark_static
            for tensor in self.cache.tensors():
                mark_static(tensor)
            options = {**COMPILE_OPTIONS.get(self.device.type, {}),
                       "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self._decode_fn = torch.compile(own_decode_function(), dynamic=True, options=options)
        return step, logits[0].float()

    @torch.inference_mode()
    def run_hidden(self, items: list[tuple[Sequence, int]]) -> tuple[StepBatch, torch.Tensor, torch.Tensor]:
        """As run, plus the final-norm hidden states [rows, dim] of the logit rows (Medusa heads
        read them); eager, with the LM head applied to just those rows."""
        step = StepBatch(self.cache, items, self.device)
        states = self.model(step.tokens, step.positions, cache=step, return_hidden=True)[0, step.logits_index]
        return step, self.model.lm_head(states).float(), states


def _decode(model, tokens, positions, cache, logits_index):
    return model(tokens, positions, cache=cache, logits_index=logits_index)


def own_decode_function():
    """A copy of _decode with a code object of its own, for one runner. Dynamo keeps compiled graphs
    per code object, so this runner's graphs are only ever looked up for its own model, which lets
    it skip Dynamo's guards on the model's modules and parameters (the engine never changes its
    model once compiling): checking them took 1.4 ms of a 13.5 ms int4 decode step on CPU."""
    return types.FunctionType(_decode.__code__.replace(), _decode.__globals__, "decode")
