"""Runs one scheduled step through the model: pack the batch, forward, return last-token logits
(and, with Medusa heads, their guesses from the same pass).

With compile_decode, decode steps (every sequence adds at most ROW_TOKENS tokens: decoding and
speculative verification, the hot loop) run through `torch.compile` over a tensor-only view of the
step (`DecodeView`), with dynamic shapes, so one graph serves every length and every batch size
above one; steps that carry longer prompt chunks run eagerly. On CPU the graph is built with Inductor's C++ wrapper and
autotuned kernels (the wrapper removes the per-kernel Python call; autotuning picks the int4
matmul); compiling SmolLM2-135M takes a minute or two per graph on 2 cores, once per engine
(Inductor caches compiled code on disk, so later processes start faster).
"""
from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.fx.experimental._config as fx_config

from lmforge.serve.paged_cache import PagedKVCache, StepBatch
from lmforge.serve.sequence import Sequence

log = logging.getLogger(__name__)

# Inductor options per device type. CPU, SmolLM2-135M int4, one thread: eager 19.0 ms/step,
# default options 14.8, cpp_wrapper 13.0, cpp_wrapper + max_autotune 11.5.
COMPILE_OPTIONS = {"cpu": {"cpp_wrapper": True, "max_autotune": True}}


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, compile_decode: bool = False, medusa_heads=None):
        self.model = model
        self.cache = cache
        self.medusa_heads = medusa_heads
        self.device = next(model.parameters()).device
        self.compile_decode = compile_decode
        self._decode_fn = None

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[StepBatch, torch.Tensor, torch.Tensor | None]:
        """-> (the packed step, float32 logits [len(step.sampled), vocab], and with Medusa heads each
        logit row's K guesses [rows, K] for the tokens after the one it samples, else None)."""
        step = StepBatch(self.cache, items, self.device)
        if self._decode_fn is not None and step.is_decode:
            try:
                with distinct_sizes():
                    logits, guesses = self._decode_fn(self.model, self.medusa_heads, step.tokens, step.positions,
                                                      step.decode_view(), step.logits_index)
                return step, logits.float(), guesses
            except Exception:  # e.g. no C++ toolchain: serving goes on eagerly (re-running the step is safe:
                log.exception("compiled decode failed; decoding eagerly from now on")  # writes are idempotent)
                self._decode_fn, self.compile_decode = None, False
        logits, guesses = _decode(self.model, self.medusa_heads, step.tokens, step.positions, step, step.logits_index)
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
        return step, logits.float(), guesses


@contextlib.contextmanager
def distinct_sizes():
    """Dynamo traces with duck sizing off: by default, sizes that are equal when a graph is traced
    become one symbol, and a two-stream decode has 2 tokens and 2 logits rows, so the first step with
    a short prompt among the decodes (more tokens than logits rows) recompiled: a minute's stall in the
    middle of serving. Read only while tracing; set per call, as it is process-wide (9 us)."""
    old, fx_config.use_duck_shape = fx_config.use_duck_shape, False
    try:
        yield
    finally:
        fx_config.use_duck_shape = old


def _decode(model, medusa_heads, tokens, positions, cache, logits_index):
    """-> (logits [rows, vocab] at logits_index, Medusa guesses [rows, K] or None). With heads, each
    row's hidden state and its K head features go through the LM head together: one pass over the
    head's weights, which dominate a small model's step, instead of a second one for the guesses."""
    if medusa_heads is None:
        return model(tokens, positions, cache=cache, logits_index=logits_index)[0], None
    hidden = model(tokens, positions, cache=cache, return_hidden=True)[0, logits_index]
    logits = model.logits(torch.cat([hidden[:, None], medusa_heads(hidden).to(hidden.dtype)], 1))
    return logits[:, 0], logits[:, 1:].argmax(-1)


def own_decode_function():
    """A copy of _decode with a code object of its own, for one runner. Dynamo keeps compiled graphs
    per code object, so this runner's graphs are only ever looked up for its own model, which lets
    it skip Dynamo's guards on the model's modules and parameters (the engine never changes its
    model once compiling): checking them took 1.4 ms of a 13.5 ms int4 decode step on CPU."""
    return types.FunctionType(_decode.__code__.replace(), _decode.__globals__, "decode")
