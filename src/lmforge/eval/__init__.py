"""Evaluation harness: bits-per-byte, multiple choice, math, code (pass@k), needle-in-a-haystack.

    from lmforge.eval import LocalBackend, evaluate, make_task
    report = evaluate(LocalBackend.from_ref("runs/x/ckpt"), [make_task("humaneval", {"limit": 20})], "runs/x/eval")

Names are imported lazily so that `import lmforge.eval.sandbox` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "bits_per_byte": "lmforge.eval.bpb", "unigram_byte_bpb": "lmforge.eval.bpb",
    "LocalBackend": "lmforge.eval.local_backend", "EndpointBackend": "lmforge.eval.endpoint_backend",
    "GenerationRequest": "lmforge.eval.backend", "load_backend": "lmforge.eval.backend_factory",
    "evaluate": "lmforge.eval.runner", "make_task": "lmforge.eval.tasks", "ResultCache": "lmforge.eval.result_cache",
    "pass_at_k": "lmforge.eval.passk", "run_program": "lmforge.eval.sandbox", "SandboxLimits": "lmforge.eval.sandbox",
    "humaneval_pass_at_1": "lmforge.eval.quick",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.eval' has no attribute {name!r}")
